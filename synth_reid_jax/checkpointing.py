"""Orbax checkpoints of a run: the model variables, the rest of the train state, the data iterators, metadata.

Layout of `<workdir>/checkpoints/<step>/` (one Orbax composite checkpoint per step):
  manifest/         JSON: the CRC-32, dtype and shape of every saved array, checked when restoring
  model/            {"params": {"generator", "discriminator", "projector", "reid"}, "batch_stats": {"reid"}}
  train_state/      every other TrainState field (step, optimizer states) and "rng" (the run's key data)
  source_iterator/  grain iterator state, one JSON file per process
  target_iterator/  idem (absent when the run has no target stream)
  metadata/         JSON: {"kind": "train"|"inference", "step", "epoch", "num_classes", "config"}
An inference checkpoint (`save_inference_checkpoint`, e.g. from tools.import_torch) holds only model/ and
metadata/; eval, translate and extract restore just those two items, so they read both kinds.
"""

import asyncio
import dataclasses
import logging
import os
import re
import sys
import traceback
import zlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

from synth_reid_jax.errors import CheckpointDamagedError, CheckpointError, CheckpointMissingError, UserError

CHECKPOINT_DIR = "checkpoints"
MODEL = "model"
TRAIN_STATE = "train_state"
METADATA = "metadata"
MANIFEST = "manifest"  # {item: {array key: checksum}} of every array saved, checked on restore
DAMAGED_SUFFIX = ".damaged"  # a checkpoint that failed its check is renamed <step>.damaged, never deleted
# OS errors worth naming alone when a save fails (the rest of such messages is storage-library detail).
_OS_REASONS = ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system",
               "No such file or directory", "Input/output error", "Stale file handle")
ITERATOR_SUFFIX = "_iterator"
ITERATOR_NAMES = ("source", "target")  # the trainer's data streams
VARIABLE_COLLECTIONS = ("params", "batch_stats")
BEST_METRIC = "mAP"
MAX_LISTED_MISMATCHES = 10


class _OrbaxTracebacks(logging.Filter):
  """Leaves out the tracebacks Orbax logs when a save or restore fails (a full disk, a damaged file): the
  Checkpointer raises every such error again as one line saying what to do (CheckpointError)."""

  def filter(self, record):
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return not (from_orbax and record.exc_info and record.levelno >= logging.ERROR)


logging.getLogger("absl").addFilter(_OrbaxTracebacks())  # Orbax logs through absl's logger


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)


def _handler_registry(iterator_names):
  """Tells Orbax which handler reads each item, so metadata and partial restores work without saving first."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for name in (MODEL, TRAIN_STATE):
    registry.add(name, ocp.args.StandardSave, ocp.handlers.StandardCheckpointHandler)
    registry.add(name, ocp.args.StandardRestore, ocp.handlers.StandardCheckpointHandler)
  for name in (METADATA, MANIFEST):
    registry.add(name, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
    registry.add(name, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
  # Every iterator item a training checkpoint can hold, also when only the model is read (eval), so that
  # Orbax knows them and does not warn about items it could not restore.
  for name in sorted(set(iterator_names) | set(ITERATOR_NAMES)):
    for args in (grain_checkpoint.CheckpointSave, grain_checkpoint.CheckpointRestore):
      registry.add(name + ITERATOR_SUFFIX, args, grain_checkpoint.CheckpointHandler)
  return registry


def _key_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree):
  """{"params/reid/classifier/kernel": shape} for arrays, ShapeDtypeStructs and Orbax array metadata alike."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {_key_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def check_compatible(template, stored, where):
  """Raises naming every key whose shape differs (or that is missing) between a checkpoint and the model."""
  want, have = _shapes(template), _shapes(stored)
  problems = []
  for key in sorted(set(want) | set(have)):
    if key not in have:
      problems.append(f"  {key}: missing in the checkpoint, shape {want[key]} in the current model")
    elif key not in want:
      problems.append(f"  {key}: shape {have[key]} in the checkpoint, absent from the current model")
    elif want[key] != have[key]:
      problems.append(f"  {key}: shape {have[key]} in the checkpoint, {want[key]} in the current model")
  if problems:
    listed = problems[:MAX_LISTED_MISMATCHES]
    if len(problems) > len(listed):
      listed.append(f"  ... and {len(problems) - len(listed)} more")
    raise CheckpointError(
        f"The checkpoint {where} does not fit the model built from the current config:\n" + "\n".join(listed)
        + "\nUse the config the checkpoint was written with (see config.json / the checkpoint metadata), "
        "or a fresh --workdir.")


def _abstract(tree):
  """ShapeDtypeStructs carrying each leaf's sharding: Orbax restores straight into that layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _host_copy(tree):
  """Replicated arrays as numpy (one device-to-host copy each); sharded arrays stay as they are.

  Orbax would otherwise split every replicated array over its replicas to write them in parallel, compiling a
  slice per shape and device on the first save: seconds of overhead for a data-parallel state.
  """
  def copy(x):
    if isinstance(x, jax.Array) and x.is_fully_replicated:
      return np.asarray(x)
    return x
  return jax.tree.map(copy, tree)


class IteratorState(grain.DatasetIterator):
  """A data iterator's state as of some earlier moment, saved like the iterator itself.

  The trainer's batches are read ahead of the step that uses them: a checkpoint saves the state after the
  last batch consumed, which the live iterator has already moved past.
  """

  def __init__(self, state):
    super().__init__()
    self._state = state

  def __next__(self):
    raise TypeError("IteratorState only holds a saved state; it yields nothing.")

  def get_state(self):
    return self._state

  def set_state(self, state):
    self._state = state


def _local_numpy(x):
  """A host copy of an array every process holds whole (numpy, or a fully replicated jax.Array); else None."""
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0)) if x.is_fully_replicated else None
  return np.asarray(x)


def checksums(tree):
  """{"params/reid/classifier/kernel": "<crc32> <dtype> <shape>"} of every array of `tree` held whole."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = _local_numpy(leaf)
    if array is None:
      continue
    array = np.ascontiguousarray(array)
    crc = zlib.crc32(array.reshape(-1).view(np.uint8))
    out[_key_name(path)] = f"{crc:08x} {array.dtype} {list(array.shape)}"
  return out


def verify(trees, manifest, where, step):
  """Raises CheckpointDamagedError naming the first array of `trees` ({item: tree}) whose checksum differs
  from the manifest saved with the checkpoint (arrays the manifest does not list are not checked)."""
  for item, tree in trees.items():
    saved = manifest.get(item, {})
    for key, value in checksums(tree).items():
      if key in saved and saved[key] != value:
        raise CheckpointDamagedError(
            f"Checkpoint {where} is damaged: {item}/{key} does not match the checksum saved with it (a file "
            f"under {where}/{item}/ was changed).", step)


def _reason(error):
  """The part of a storage error message that tells a user what happened."""
  text = str(error)
  for reason in _OS_REASONS:
    if reason in text:
      return reason
  first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
  return re.sub(r"\s+", " ", first)[:200]


def no_checkpoint_error(directory):
  """The error for a checkpoint folder without checkpoints, with the ways to get one."""
  return CheckpointMissingError(
      f"No checkpoint in {directory}. Train first (--mode=train with this --workdir), convert one with "
      "`python -m synth_reid_jax.tools.import_torch`, or point --workdir at a trained run.")


def _state_fields(state):
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def split_state(state):
  """TrainState -> (model variables {"params", "batch_stats"}, every other field)."""
  fields = _state_fields(state)
  model = {name: fields.pop(name) for name in VARIABLE_COLLECTIONS}
  return model, fields


def _is_closed_loop_callback(unraisable) -> bool:
  """Whether an unraisable error is an I/O callback that found its event loop closed: tensorstore completes
  the other writes of an Orbax save that failed (a full disk) after Orbax has closed the loop awaiting them,
  and reports each one. The failure itself is raised by the save; these are its echoes."""
  error = unraisable.exc_value
  if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
    return False
  package = os.path.dirname(asyncio.__file__)
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return bool(frames) and all(os.path.dirname(frame.filename) == package for frame in frames)


class _FailedWriteEchoes(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" records of writes that failed for storage reasons:
  the other writes of a failed Orbax save, collected after the save has raised (and been reported)."""

  def filter(self, record):
    if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
      return True
    error = record.exc_info[1]
    return not any(reason in str(error) for reason in _OS_REASONS + ("RESOURCE_EXHAUSTED",))


def quiet_failed_save_echoes():
  """A failed save is reported once, by the save (one line); what follows it is silenced here.

  Installs a sys.unraisablehook that drops `_is_closed_loop_callback` errors (a screen of identical
  tracebacks) and hands every other one to the previous hook, and `_FailedWriteEchoes` on asyncio's logger."""
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _FailedWriteEchoes) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_FailedWriteEchoes())
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


class Checkpointer:
  """Saves and restores a run's checkpoints; keeps `keep` latest plus the best by eval mAP."""

  def __init__(self, workdir, keep=3, async_save=True, iterator_names=("source", "target")):
    self.directory = checkpoint_dir(workdir)
    policies = [ocp.checkpoint_managers.LatestN(n=keep),
                ocp.checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1,
                                              keep_checkpoints_without_metrics=False)]
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True)  # an interrupted save leaves a tmp directory: never restored
    self._iterator_names = tuple(iterator_names)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_handler_registry(self._iterator_names))
    self._saving = None  # the step of the save in flight, if any
    quiet_failed_save_echoes()

  def steps(self):
    return list(self._manager.all_steps())

  def latest_step(self):
    return self._manager.latest_step()

  def resolve_step(self, step):
    """`step`, or the latest when None; raises naming the directory (and the steps there) when missing."""
    steps = self.steps()
    if not steps:
      raise no_checkpoint_error(self.directory)
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointMissingError(
          f"No checkpoint for step {step} in {self.directory}; available steps: {steps}.")
    return step

  def _items(self, step):
    return set(os.listdir(os.path.join(self.directory, str(step))))

  def save(self, step, state, *, metadata, iterators=None, iterator_states=None, rng=None, metrics=None):
    """Starts an (async) save of the whole training state; `metrics` ({"mAP": ...}) rank the best.

    The data iterators' positions come from `iterators` (live, read now) or `iterator_states` ({name: the
    state from get_state() after the last batch the saved state consumed})."""
    model, rest = split_state(state)
    if rng is not None:
      rest["rng"] = jax.random.key_data(rng)
    model, rest = _host_copy(model), _host_copy(rest)
    items = {MODEL: ocp.args.StandardSave(model), TRAIN_STATE: ocp.args.StandardSave(rest),
             METADATA: ocp.args.JsonSave(dict(metadata, kind="train", step=int(step))),
             MANIFEST: ocp.args.JsonSave({MODEL: checksums(model), TRAIN_STATE: checksums(rest)})}
    saved = {name: IteratorState(iterator.get_state()) for name, iterator in (iterators or {}).items()}
    saved.update({name: IteratorState(s) for name, s in (iterator_states or {}).items()})
    for name, iterator in saved.items():
      items[name + ITERATOR_SUFFIX] = grain_checkpoint.CheckpointSave(iterator)
    self.wait_until_finished()  # reports a failed earlier save before starting this one
    self._saving = int(step)
    try:
      return self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 - any storage failure: said in one line, with what to do
      raise self._save_failed(e) from e

  def _save_failed(self, error):
    step, self._saving = self._saving, None
    intact = [s for s in self._reloaded_steps() if s != step]
    newest = (f"the newest intact checkpoint is step {max(intact)}" if intact
              else "no checkpoint was written before it")
    return CheckpointError(
        f"Saving checkpoint {step} in {self.directory} failed: {_reason(error)}. Training stopped; {newest}. "
        "Fix the cause (space, permissions, the mount) and rerun the same command to resume.")

  def _reloaded_steps(self):
    try:
      self._manager.reload()
      return self.steps()
    except Exception:  # noqa: BLE001 - the storage may be unreadable too; then nothing is known to be intact
      return []

  def _read(self, step, read):
    """read() with any storage or format error turned into one CheckpointDamagedError naming the step."""
    try:
      return read()
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 - truncated files, bad JSON, tensorstore errors: all "damaged"
      raise CheckpointDamagedError(
          f"Checkpoint {self.directory}/{step} cannot be read: {_reason(e)}.", step) from e

  def _manifest(self, step):
    if MANIFEST not in self._items(step):
      return {}  # written before checksums existed, or by tools.import_torch
    return self._read(step, lambda: self._manager.restore(
        step, args=ocp.args.Composite(**{MANIFEST: ocp.args.JsonRestore()}))[MANIFEST])

  def metadata(self, step=None):
    step = self.resolve_step(step)
    return self._read(step, lambda: self._manager.restore(
        step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA])

  def restore_training(self, state, *, iterators=None, rng=None, step=None):
    """Restores state (into `state`'s shardings), iterators (in place) and rng; -> (state, rng, metadata).

    The arrays are checked against the checksums saved with them; a checkpoint that cannot be read or does
    not match raises CheckpointDamagedError."""
    step = self.resolve_step(step)
    where = f"{self.directory}/{step}"
    if TRAIN_STATE not in self._items(step):
      raise CheckpointError(
          f"The checkpoint {where} holds only inference weights (e.g. from tools.import_torch) and cannot "
          "resume training; use it with --mode=eval/translate/extract, or train in a fresh --workdir.")
    model, rest = split_state(state)
    if rng is not None:
      rest["rng"] = jax.random.key_data(rng)
    manifest = self._manifest(step)
    stored = self._read(step, lambda: self._manager.item_metadata(step))
    check_compatible(model, stored[MODEL].tree, where)
    check_compatible(rest, stored[TRAIN_STATE].tree, where)
    items = {MODEL: ocp.args.StandardRestore(_abstract(model)),
             TRAIN_STATE: ocp.args.StandardRestore(_abstract(rest)), METADATA: ocp.args.JsonRestore()}
    for name, iterator in (iterators or {}).items():
      if name + ITERATOR_SUFFIX not in self._items(step):
        raise CheckpointError(f"The checkpoint {where} has no state for the {name} data iterator; the run it "
                              "came from had a different data setup. Resume with its config or use a fresh "
                              "--workdir.")
      items[name + ITERATOR_SUFFIX] = grain_checkpoint.CheckpointRestore(iterator)
    restored = self._read(step, lambda: self._manager.restore(step, args=ocp.args.Composite(**items)))
    verify({MODEL: restored[MODEL], TRAIN_STATE: restored[TRAIN_STATE]}, manifest, where, step)
    fields = dict(restored[TRAIN_STATE], **restored[MODEL])
    if rng is not None:
      rng = jax.random.wrap_key_data(fields.pop("rng"), impl=jax.random.key_impl(rng))
    return state.replace(**fields), rng, restored[METADATA]

  def restore_newest_intact(self, state, *, iterators=None, rng=None, report=print):
    """restore_training from the newest checkpoint that restores and passes its check. Each damaged one is
    reported in one line and renamed <step>.damaged (kept, never deleted). -> (state, rng, metadata), or
    None when no intact checkpoint is left."""
    for step in sorted(self.steps(), reverse=True):
      try:
        return self.restore_training(state, iterators=iterators, rng=rng, step=step)
      except CheckpointDamagedError as e:
        report(f"{e} Renamed it to {self.set_aside(step)}; trying the previous checkpoint.")
    return None

  def set_aside(self, step):
    """Renames checkpoint `step` to <step>.damaged (or .damaged<n>), out of Orbax's sight; -> the new path."""
    source = os.path.join(self.directory, str(step))
    target, n = source + DAMAGED_SUFFIX, 1
    while os.path.exists(target):
      target, n = f"{source}{DAMAGED_SUFFIX}{n}", n + 1
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()
    return target

  def newest_intact_before(self, variables, step, networks=None):
    """The newest step older than `step` whose variables restore and pass their check, or None."""
    for older in sorted((s for s in self.steps() if s < step), reverse=True):
      try:
        self.restore_variables(variables, step=older, networks=networks)
        return older
      except CheckpointDamagedError:
        continue
    return None

  def restore_variables(self, variables, *, step=None, networks=None):
    """Restores {"params", "batch_stats"} of `networks` (default: all of `variables`) into their shardings.

    Reads train and inference checkpoints alike. Networks not asked for are not returned (eval needs only
    the generator or stem and the re-ID network), yet every array read is checked: a checkpoint with any
    damaged array is reported as damaged whichever network the damage lies in. -> (variables, metadata).
    """
    step = self.resolve_step(step)
    where = f"{self.directory}/{step}"
    manifest = self._manifest(step)
    stored = self._read(step, lambda: self._manager.item_metadata(step)[MODEL].tree)
    networks = set(networks or {net for collection in variables.values() for net in collection})
    select = lambda tree: {col: {net: t for net, t in tree.get(col, {}).items() if net in networks}
                           for col in variables}
    wanted = select(variables)
    check_compatible(wanted, select(stored), where)
    # Orbax restores whole items: networks not asked for are read as stored and dropped.
    fallback = jax.tree.leaves(variables)[0].sharding
    as_stored = lambda tree: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=fallback), tree)
    target = {col: {net: _abstract(wanted[col][net]) if net in networks else as_stored(tree)
                    for net, tree in stored[col].items()} for col in stored}
    restored = self._read(step, lambda: self._manager.restore(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardRestore(target), METADATA: ocp.args.JsonRestore()})))
    model = {col: {net: tree for net, tree in restored[MODEL][col].items() if net in networks}
             for col in restored[MODEL]}
    verify({MODEL: restored[MODEL]}, manifest, where, step)
    return model, restored[METADATA]

  def wait_until_finished(self):
    """Waits for the save in flight; a failed one raises CheckpointError in one line."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001
      if self._saving is None:
        raise
      raise self._save_failed(e) from e
    self._saving = None

  def reached_preemption(self, step):
    """True on every host at the same step once any host got a preemption notice (multi-host runs)."""
    return self._manager.reached_preemption(step)

  def close(self):
    self._manager.close()


def save_inference_checkpoint(workdir, params, batch_stats, step, metadata):
  """Writes model/ and metadata/ only (what eval/translate/extract need), e.g. for converted weights.

  `params` is {"generator", "reid"[, "discriminator", "projector"]}, `batch_stats` {"reid": ...};
  `metadata` must hold "num_classes" (the re-ID classifier's width) and should hold "config" (a dict).
  """
  if "num_classes" not in metadata:
    raise CheckpointError("save_inference_checkpoint: metadata needs 'num_classes' (the classifier's width).")
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), handler_registry=_handler_registry(()),
                                  options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  model = jax.tree.map(np.asarray, {"params": params, "batch_stats": batch_stats})
  manager.save(int(step), force=True, args=ocp.args.Composite(**{
      MODEL: ocp.args.StandardSave(model), MANIFEST: ocp.args.JsonSave({MODEL: checksums(model)}),
      METADATA: ocp.args.JsonSave(dict(metadata, kind="inference", step=int(step)))}))
  manager.wait_until_finished()
  manager.close()
