"""Grain input pipelines: the labelled source stream, the unlabelled target stream and ordered evaluation.

Training streams are infinite and index-addressed: position `g` of the global stream (all processes together)
is image `g % (steps_per_epoch * global_batch)` of epoch `g // (steps_per_epoch * global_batch)`, whose order
is a pure function of (seed, epoch) - a fresh permutation every epoch (torchreid's RandomSampler with
drop_last) or torchreid's RandomIdentitySampler (P identities x K images). The target stream may instead
restart as the original's loader does (`target_pass`): a fresh pass at every source epoch and whenever it runs
out within one. Augmentation draws from grain's per-position generator. So the stream is the same for any
number of processes or workers: process `p` of `n` takes the p-th slice of every global batch, and the
iterator's state (`get_state` / `set_state`) is just the number of batches taken, which resumes the identical
stream.
"""

import dataclasses
import os
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence

import grain
import numpy as np
from absl import flags

from synth_reid_jax import transforms as transforms_lib
from synth_reid_jax.errors import ConfigError

SPLITS = ("train", "query", "gallery")
SAMPLERS = ("random", "pk")
# Identities torchreid ignores when it merges a dataset's test splits into training (`_junk_pids`); pid -1
# junk images never reach the records.
DISTRACTOR_PIDS = {"market1501": (0,)}
# Splits that hold more images of a dataset's train identities: MSMT17's list_val.txt. torchreid adds it to
# the train split only with combineall (its note: not comparable with published results otherwise); so does
# the source here, and config.data.msmt17_list_val adds it wherever the dataset trains (source or target).
EXTRA_TRAIN_SPLITS = {"msmt17": ("val",)}
TRAIN_SPLITS = ("train", "val")  # splits whose identities are the train split's
# An "infinite" stream (as grain's repeat(None)); positions stay far below the uint64 limit of grain's rngs.
_STREAM_LENGTH = sys.maxsize
# Salts that keep the random draws of different purposes independent for one config.seed.
_SUBSAMPLE_SALT, _ORDER_SALT, _AUGMENT_SALT, _VAL_SALT, _VAL_QUERY_SALT = 1, 2, 3, 4, 5
_SOURCE_STREAM, _TARGET_STREAM = 0, 1
# Records read per call while collecting a split's labels.
_LABEL_READ_CHUNK = 1024


# --- Records and labels ---------------------------------------------------------------------------


def load_split(config, name: str, split: str):
  """The random-access records of one split of a TFDS dataset (built on first use), images as encoded bytes.

  The bytes are decoded here with PIL, as torchreid reads images (TFDS would prefer OpenCV when installed). A
  record that cannot be read (a damaged dataset folder) raises a DatasetError naming the folder and the fix,
  also when read in a worker process.
  """
  from synth_reid_jax.datasets import builders  # the TFDS builders are only needed when reading real datasets

  builder = builders.get_builder(name, os.path.expanduser(config.data.data_dir),
                                 os.path.expanduser(config.data.manual_dir))
  return builders.open_split(builder, split)


def _as_str(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class SplitLabels:
  """pid, camid and file name of every record of a split, in record order."""
  pids: np.ndarray  # int64 (N,), the dataset's own identity numbers
  camids: np.ndarray  # int32 (N,)
  filenames: np.ndarray  # object (N,) of str

  def __len__(self):
    return len(self.pids)

  def take(self, index) -> "SplitLabels":
    """The labels of the records at `index`, in that order."""
    return SplitLabels(self.pids[index], self.camids[index], self.filenames[index])


def read_labels(records: Sequence[Mapping]) -> SplitLabels:
  """Read the labels of every record (batched reads when the source offers `__getitems__`)."""
  pids, camids, filenames = [], [], []
  getitems = getattr(records, "__getitems__", None)
  for start in range(0, len(records), _LABEL_READ_CHUNK):
    keys = range(start, min(start + _LABEL_READ_CHUNK, len(records)))
    chunk = getitems(list(keys)) if getitems is not None else [records[k] for k in keys]
    for record in chunk:
      pids.append(int(record["pid"]))
      camids.append(int(record["camid"]))
      filenames.append(_as_str(record.get("filename", "")))
  return SplitLabels(np.asarray(pids, np.int64), np.asarray(camids, np.int32), np.asarray(filenames, object))


# --- The training example table -------------------------------------------------------------------


def _empty_index():
  return np.zeros((0,), np.int64)


@dataclasses.dataclass(frozen=True)
class Examples:
  """The training images of a stream: where each one lives and its contiguous label."""
  splits: tuple[str, ...]  # the splits the examples come from
  split_index: np.ndarray  # int32 (N,): position in `splits`
  record_index: np.ndarray  # int64 (N,): record number within that split
  labels: np.ndarray  # int32 (N,): identities relabelled 0..num_classes-1
  num_classes: int
  # Validation mode: the identities held out of the train split and their images' train record numbers
  # (after n_samples, in record order).
  val_pids: np.ndarray = dataclasses.field(default_factory=_empty_index)
  val_record_index: np.ndarray = dataclasses.field(default_factory=_empty_index)

  def __len__(self):
    return len(self.labels)


def source_splits(combineall: bool, include_query: bool = False,
                  extra_train: Sequence[str] = ()) -> tuple[str, ...]:
  """Splits that form the source training set.

  synth-reid's combineall merges the train and gallery folders only (its `combine_all` leaves the query out);
  `include_query` gives torchreid's train + query + gallery. `extra_train` (EXTRA_TRAIN_SPLITS) follows train.
  """
  train = ("train", *extra_train)
  if not combineall:
    return train
  return train + (("query", "gallery") if include_query else ("gallery",))


def extra_train_splits(config, name: str, combineall: bool) -> tuple[str, ...]:
  """The EXTRA_TRAIN_SPLITS of dataset `name` that join its train split: with combineall (torchreid) or
  config.data.msmt17_list_val."""
  joined = combineall or config.data.get("msmt17_list_val", False)
  return tuple(EXTRA_TRAIN_SPLITS.get(name, ())) if joined else ()


def subsample_per_identity(pids: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
  """Sorted indices keeping at most `n_samples` images per pid, drawn without replacement (0 keeps all)."""
  if n_samples < 0:
    raise ValueError(f"n_samples must be >= 0 (0 keeps every image), got {n_samples}.")
  if n_samples == 0:
    return np.arange(len(pids))
  keep = []
  for pid in np.unique(pids):
    members = np.flatnonzero(pids == pid)
    if len(members) > n_samples:
      members = rng.choice(members, n_samples, replace=False)
    keep.append(members)
  return np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)


def draw_val_pids(pids: np.ndarray, val_ids: int, seed: int, distractor_pids: Sequence[int] = (),
                  dataset: str = "the dataset") -> np.ndarray:
  """The sorted identities held out for validation: `val_ids` of the train split's pids, drawn with `seed`."""
  candidates = np.setdiff1d(np.unique(pids), distractor_pids)
  if not 0 < val_ids < len(candidates):
    fix = (f"lower it (at most {len(candidates) - 1}) or set config.data.val=False" if len(candidates) > 1
           else "set config.data.val=False")
    raise ConfigError(f"config.data.val_ids={val_ids}: the train split of {dataset} has {len(candidates)} "
                      f"identities and at least one must stay for training; {fix}.")
  rng = np.random.default_rng([seed, _VAL_SALT])
  return np.sort(rng.choice(candidates, val_ids, replace=False))


def build_examples(labels: Mapping[str, SplitLabels], splits: Sequence[str], n_samples: int, seed: int,
                   distractor_pids: Sequence[int] = (), val_ids: int = 0,
                   dataset: str = "the dataset") -> Examples:
  """Merge splits into one relabelled training set, as torchreid's combine_all with synth-reid's n_samples.

  Each split keeps at most n_samples images per pid (the original subsamples each folder separately). With
  `val_ids` > 0, that many identities of the subsampled train split are held out (the original's
  `_train_val_split`; `splits` must start with "train"); their images in the other TRAIN_SPLITS do not train
  either. The train identities (TRAIN_SPLITS) become labels 0..T-1 in pid order; the test identities (query
  and gallery share them, distractors dropped) follow as T.., even where a pid number also occurs in train.
  The train split is drawn first, so its subsample and held-out identities do not depend on the splits that
  follow.
  """
  rng = np.random.default_rng([seed, _SUBSAMPLE_SALT])
  if val_ids and (not splits or splits[0] != "train"):
    raise ValueError(f"Validation holds identities out of the train split; splits {tuple(splits)} must start "
                     "with 'train'.")
  split_index, record_index, keys = [], [], []
  val_pids, val_record_index = _empty_index(), _empty_index()
  for i, split in enumerate(splits):
    pids = labels[split].pids
    kept = np.arange(len(pids))
    if split != "train":
      kept = kept[~np.isin(pids, distractor_pids)]
    kept = kept[subsample_per_identity(pids[kept], n_samples, rng)]
    if split == "train" and val_ids:
      val_pids = draw_val_pids(pids[kept], val_ids, seed, distractor_pids, dataset)
      held_out = np.isin(pids[kept], val_pids)
      val_record_index, kept = kept[held_out].astype(np.int64), kept[~held_out]
    elif split in TRAIN_SPLITS and len(val_pids):
      kept = kept[~np.isin(pids[kept], val_pids)]
    split_index.append(np.full(len(kept), i, np.int32))
    record_index.append(kept)
    group = 0 if split in TRAIN_SPLITS else 1
    keys.append(np.stack([np.full(len(kept), group), pids[kept]], axis=1))
  keys = np.concatenate(keys)
  _, label = np.unique(keys, axis=0, return_inverse=True)  # lexicographic (group, pid): train first
  label = label.reshape(-1).astype(np.int32)
  return Examples(tuple(splits), np.concatenate(split_index), np.concatenate(record_index).astype(np.int64),
                  label, int(label.max()) + 1 if len(label) else 0, val_pids, val_record_index)


# --- Epoch orders (samplers) ----------------------------------------------------------------------


def random_order(num_images: int, rng: np.random.Generator) -> np.ndarray:
  """A fresh permutation of the images (torchreid's RandomSampler)."""
  return rng.permutation(num_images)


def pk_order(labels: np.ndarray, num_instances: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
  """One pass of torchreid's RandomIdentitySampler: batches of P = batch_size // K identities x K images.

  Each identity's images are shuffled (drawn with replacement up to K when it has fewer) and cut into groups
  of K; batches then take P random identities that still have a group left, until fewer than P remain.
  """
  num_ids_per_batch = batch_size // num_instances
  groups = {}
  for pid in np.unique(labels):
    members = np.flatnonzero(labels == pid)
    if len(members) < num_instances:
      members = rng.choice(members, num_instances, replace=True)
    members = rng.permutation(members)
    usable = len(members) - len(members) % num_instances
    groups[pid] = list(members[:usable].reshape(-1, num_instances))
  available = [pid for pid in groups if groups[pid]]
  order = []
  while len(available) >= num_ids_per_batch:
    chosen = rng.choice(len(available), num_ids_per_batch, replace=False)
    selected = [available[i] for i in chosen]
    for pid in selected:
      order.append(groups[pid].pop(0))
      if not groups[pid]:
        available.remove(pid)
  return np.concatenate(order) if order else np.zeros((0,), np.int64)


def target_pass(step: int, source_steps_per_epoch: int, target_steps_per_pass: int) -> tuple[int, int, int]:
  """(source epoch e, pass p, batch position) of the target batch taken at train step `step`.

  The original re-creates the target loader's iterator at the start of every source epoch and again when it
  runs out within one (engine.train), so pass p of epoch e is a fresh permutation; drop_last cuts each pass to
  `target_steps_per_pass` batches.
  """
  epoch, step_in_epoch = divmod(step, source_steps_per_epoch)
  pass_index, position = divmod(step_in_epoch, target_steps_per_pass)
  return epoch, pass_index, position


@dataclasses.dataclass(frozen=True)
class PassLayout:
  """Where image `g` of a global stream comes from: (the key of its pass's order, position in that order).

  Continuous: pass (epoch,) of `steps_per_pass` batches after another. With `restart_every` (the source's
  steps per epoch): the target's restarting passes (epoch, p) of `target_pass`.
  """
  global_batch: int
  steps_per_pass: int
  restart_every: int | None = None

  def __call__(self, g: int) -> tuple[tuple[int, ...], int]:
    step, slot = divmod(g, self.global_batch)
    if self.restart_every is None:
      epoch, position = divmod(step, self.steps_per_pass)
      key = (epoch,)
    else:
      epoch, pass_index, position = target_pass(step, self.restart_every, self.steps_per_pass)
      key = (epoch, pass_index)
    return key, position * self.global_batch + slot


class EpochOrders:
  """The image order of every pass, a pure function of (seed, pass key), `epoch_length` images long.

  A pass key is (epoch,) for a continuous stream (an int works too) or (epoch, pass) for the target's
  restarts.
  """

  def __init__(self, labels: np.ndarray, epoch_length: int, seed: int, sampler: str = "random",
               num_instances: int = 4, batch_size: int = 1):
    if sampler not in SAMPLERS:
      raise ValueError(f"Unknown sampler {sampler!r} (config.data.sampler); choose from {SAMPLERS}.")
    self.labels, self.epoch_length, self.seed = labels, epoch_length, seed
    self.sampler, self.num_instances, self.batch_size = sampler, num_instances, batch_size
    self._cache, self._lock = {}, threading.Lock()

  def __getstate__(self):  # for grain's worker processes: no lock, no cache
    return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cache, self._lock = {}, threading.Lock()

  def _generate(self, key: tuple[int, ...]) -> np.ndarray:
    if self.sampler == "random":
      rng = np.random.default_rng([self.seed, _ORDER_SALT, *key])
      return random_order(len(self.labels), rng)[:self.epoch_length]
    # A PK pass yields a little less than the images; further passes fill the epoch to its fixed length.
    passes, have = [], 0
    while have < self.epoch_length:
      rng = np.random.default_rng([self.seed, _ORDER_SALT, *key, len(passes)])
      passes.append(pk_order(self.labels, self.num_instances, self.batch_size, rng))
      have += len(passes[-1])
    return np.concatenate(passes)[:self.epoch_length]

  def __call__(self, key: int | tuple[int, ...]) -> np.ndarray:
    key = (int(key),) if np.isscalar(key) else tuple(int(k) for k in key)
    with self._lock:  # reader threads share the cache
      order = self._cache.get(key)
      if order is None:
        order = self._generate(key)
        if len(self._cache) >= 2:  # the stream moves forward: keep the current and the previous pass
          self._cache.pop(min(self._cache))
        self._cache[key] = order
    return order


# --- grain datasets -------------------------------------------------------------------------------


class _StreamRecords(grain.MapDataset):
  """Infinite global stream of raw records {"image", "pid"} in epoch order."""

  def __init__(self, records: Sequence[Sequence[Mapping]], examples: Examples, orders: EpochOrders,
               layout: PassLayout, with_labels: bool):
    super().__init__()
    self._records, self._examples, self._orders, self._layout = records, examples, orders, layout
    self._with_labels = with_labels

  def __len__(self):
    return _STREAM_LENGTH

  def __str__(self):
    return f"_StreamRecords(num_images={len(self._examples)}, sampler={self._orders.sampler})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    key, position = self._layout(index)
    example = self._orders(key)[position]
    split = self._examples.split_index[example]
    record = self._records[split][int(self._examples.record_index[example])]
    element = {"image": record["image"]}
    if self._with_labels:
      element["pid"] = self._examples.labels[example]
    return element


class _EvalRecords(grain.MapDataset):
  """A split in record order, padded to whole global batches; padding has mask False and index -1."""

  def __init__(self, records: Sequence[Mapping], labels: SplitLabels, length: int, height: int, width: int):
    super().__init__()
    self._records, self._labels, self._length = records, labels, length
    self._padding = np.zeros((height, width, 3), np.uint8)

  def __len__(self):
    return self._length

  def __str__(self):
    return f"_EvalRecords(num_images={len(self._labels)}, padded_length={self._length})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index >= len(self._labels):
      return {"image": self._padding, "pid": -1, "camid": -1, "index": -1, "mask": False}
    return {"image": self._records[index]["image"], "pid": self._labels.pids[index],
            "camid": self._labels.camids[index], "index": index, "mask": True}


class _StackAndNormalize:
  """grain batch_fn: stack a list of elements; the uint8 images become one normalised float32 array.

  random_erase's rectangles (transforms.ERASE_KEY) are painted into the normalised images, where torchreid's
  RandomErasing acts, and leave the batch.
  """

  _DTYPES = {"pid": np.int32, "camid": np.int32, "index": np.int32, "mask": np.bool_, "unreadable": np.bool_}

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    self.mean, self.std = tuple(mean), tuple(std)
    self.table = transforms_lib.normalize_table(mean, std)

  def __call__(self, elements: Sequence[dict]) -> dict:
    images = np.stack([e["image"] for e in elements])
    batch = {"image": transforms_lib.normalize(images, self.mean, self.std, self.table)}
    if transforms_lib.ERASE_KEY in elements[0]:
      boxes = np.stack([e[transforms_lib.ERASE_KEY] for e in elements])
      transforms_lib.erase(batch["image"], boxes, self.mean)
    for key in elements[0]:
      if key not in ("image", transforms_lib.ERASE_KEY):
        batch[key] = np.asarray([e[key] for e in elements], self._DTYPES.get(key))
    return batch


def _process_grid(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only asked when the caller does not say which process this is

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int, what: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"{what} {global_batch_size} must be a positive multiple of the number of processes "
                     f"({process_count}); change it or the process count.")
  return global_batch_size // process_count


def _seed_for(config, *salts: int) -> int:
  return int(np.random.SeedSequence([config.seed, *salts]).generate_state(1)[0])


def _to_iter(batches: grain.MapDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
  """Batches read ahead by threads in this process or, with num_workers > 0, by worker processes."""
  if num_workers < 0:
    raise ValueError(f"config.data.num_workers must be >= 0, got {num_workers}.")
  buffered = max(1, prefetch)
  # Without workers, `prefetch` threads each build a batch; each worker process builds whole batches alone.
  threads = buffered if num_workers == 0 else 1
  iter_ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffered))
  if num_workers > 0:
    # grain 0.2.18 reads an absl flag when starting workers, which fails in scripts and notebooks that never
    # parse flags (google/grain#1355); the flags' defaults are what is meant there.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                               per_worker_buffer_size=buffered))
  return iter_ds


def _close_running(running: list):
  while running:
    running.pop().close()


class ResumableIterator(grain.DatasetIterator):
  """Iterates a MapDataset of batches; its state {"step": batches taken} resumes the identical stream.

  Unlike the states of grain's prefetch iterators, the state does not depend on the number of workers (and
  is the same on every process), so a run may resume with other data loading settings. Without worker
  processes each batch is built in the calling thread when asked for: the trainer asks from its own
  prefetching thread, so grain's reading threads would only add a second hand-off (and, on a CPU, take
  cores from the step).
  """

  def __init__(self, batches: grain.MapDataset, num_workers: int = 0, prefetch: int = 1):
    super().__init__()
    self._batches, self._num_workers, self._prefetch = batches, num_workers, prefetch
    self._step = 0
    self._running = []  # the grain iterator of the current run, if started

  def _start(self):
    if not self._running:
      self._running.append(iter(_to_iter(self._batches[self._step:], self._num_workers, self._prefetch)))
      # Stops worker processes and threads when this iterator goes away or, at the latest, at exit: grain's
      # own clean-up of a live iterator during interpreter shutdown fails noisily.
      self._finalizer = weakref.finalize(self, _close_running, self._running)
    return self._running[0]

  def __next__(self):
    self._assert_not_closed()
    batch = self._batches[self._step] if self._num_workers == 0 else next(self._start())
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, Mapping) or "step" not in state or int(state["step"]) < 0:
      raise ValueError(f"Expected an input pipeline state {{'step': n >= 0}}, got {state!r}.")
    self._stop()
    self._step = int(state["step"])

  def start_prefetch(self) -> None:
    if self._num_workers > 0:
      self._start().start_prefetch()

  def _stop(self):
    if self._running:
      self._finalizer()

  def close(self) -> None:
    self._stop()
    super().close()

  def __str__(self):
    return f"ResumableIterator(step={self._step}, num_workers={self._num_workers})"


def _split_records(config, name: str, splits: Sequence[str],
                   data_sources: Mapping[str, Sequence[Mapping]] | None) -> dict:
  records = {}
  for split in splits:
    if data_sources is not None:
      if split not in data_sources:
        raise ValueError(f"data_sources has no split {split!r} (has {sorted(data_sources)}).")
      records[split] = data_sources[split]
    else:
      records[split] = load_split(config, name, split)
    if len(records[split]) == 0:
      raise ValueError(f"Split {split!r} of dataset {name!r} is empty; check config.data "
                       "(source/target/manual_dir) and rebuild the dataset.")
  return records


# --- Pipelines -------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainStream:
  """An infinite, checkpointable stream of process-local training batches, plus what the trainer needs."""
  iterator: "ResumableIterator"  # yields {"image": f32 (b,H,W,3) [, "pid": int32 (b,)]}; get/set_state
  batches: grain.MapDataset  # batch k of this process at index k
  num_images: int  # images in one epoch's pool (after combineall and n_samples)
  num_classes: int  # identities (0 for the unlabelled target)
  steps_per_epoch: int  # num_images // global_batch_size (the remainder is dropped each epoch)
  batch_size: int  # per process
  global_batch_size: int


def val_dataset(config) -> str:
  """The dataset config.data.val holds identities out of: the target when the config has one (the original's
  adversarial `adv_val`), else the source (its plain `val`, e.g. the baseline)."""
  return config.data.target or config.data.source


def _held_out_ids(config, name: str) -> int:
  data = config.data
  return data.val_ids if data.val and val_dataset(config) == name else 0


def _source_examples(config, labels: Mapping[str, SplitLabels], splits: Sequence[str]) -> Examples:
  """The source's training set, and when the source validates its held-out identities (one draw for both
  uses)."""
  data = config.data
  return build_examples(labels, splits, data.n_samples, _seed_for(config, _SOURCE_STREAM),
                        DISTRACTOR_PIDS.get(data.source, ()), _held_out_ids(config, data.source), data.source)


def _target_examples(config, labels: Mapping[str, SplitLabels], splits: Sequence[str]) -> Examples:
  """The target's training images (all of them, n_samples does not apply), and with config.data.val its
  held-out identities, drawn as the source's would be."""
  target = config.data.target
  return build_examples(labels, splits, 0, _seed_for(config, _TARGET_STREAM), DISTRACTOR_PIDS.get(target, ()),
                        _held_out_ids(config, target), target)


def _train_stream(config, name: str, splits: Sequence[str], make_examples, with_labels: bool,
                  stream_salt: int, process_index, process_count, data_sources,
                  restart_every: int | None = None) -> TrainStream:
  """`make_examples(labels per split)` gives the stream's Examples."""
  data = config.data
  process_index, process_count = _process_grid(process_index, process_count)
  global_batch = config.train.batch_size
  local_batch = _local_batch_size(global_batch, process_count, "config.train.batch_size")
  records = _split_records(config, name, splits, data_sources)
  examples = make_examples({split: read_labels(records[split]) for split in splits})
  steps_per_epoch = len(examples) // global_batch
  if steps_per_epoch == 0:
    raise ConfigError(f"config.train.batch_size={global_batch}: dataset {name!r} ({'+'.join(splits)}) has "
                      f"{len(examples)} training images, fewer than one global batch; lower "
                      "config.train.batch_size.")
  sampler = data.sampler if with_labels else "random"
  if sampler == "pk":
    k = data.num_instances
    if k <= 0 or global_batch % k:
      raise ConfigError(f"The PK sampler needs config.train.batch_size ({global_batch}) to be a multiple of "
                        f"config.data.num_instances ({k}).")
    if examples.num_classes < global_batch // k:
      raise ConfigError(f"config.train.batch_size={global_batch} with config.data.sampler='pk': the PK "
                        f"sampler needs {global_batch // k} identities per batch "
                        f"(config.data.num_instances={k}) but {name!r} has {examples.num_classes}; lower "
                        "config.train.batch_size or config.data.num_instances.")
  if restart_every is not None and restart_every <= 0:
    raise ValueError(f"source_steps_per_epoch must be positive, got {restart_every}.")
  orders = EpochOrders(examples.labels, steps_per_epoch * global_batch, _seed_for(config, stream_salt),
                       sampler, data.num_instances, global_batch)
  layout = PassLayout(global_batch, steps_per_epoch, restart_every)
  batches = (
      _StreamRecords([records[s] for s in splits], examples, orders, layout, with_labels)
      .random_map(transforms_lib.train_transform(config), seed=_seed_for(config, stream_salt, _AUGMENT_SALT))
      .batch(local_batch, drop_remainder=True, batch_fn=_StackAndNormalize(data.mean, data.std))
  )[process_index::process_count]
  iterator = ResumableIterator(batches, data.num_workers, data.prefetch)
  return TrainStream(iterator, batches, len(examples), examples.num_classes if with_labels else 0,
                     steps_per_epoch, local_batch, global_batch)


def create_source_pipeline(config, process_index: int | None = None, process_count: int | None = None, *,
                           data_sources: Mapping[str, Sequence[Mapping]] | None = None) -> TrainStream:
  """Labelled source batches {"image", "pid"}: config.data.source, combineall, n_samples, sampler.

  With config.data.val and no target, the held-out validation identities (`create_val_pipelines`) are left
  out and the rest relabelled, so num_classes counts only the trained identities; with a target the source
  stays whole. `data_sources` (split -> records) replaces reading the TFDS dataset, e.g. for in-memory data.
  """
  data = config.data
  # combineall_query (torchreid's merge of the query split too) is optional: synth-reid leaves the query out.
  splits = source_splits(data.combineall, data.get("combineall_query", False),
                         extra_train_splits(config, data.source, data.combineall))
  return _train_stream(config, data.source, splits, lambda labels: _source_examples(config, labels, splits),
                       True, _SOURCE_STREAM, process_index, process_count, data_sources)


def create_target_pipeline(config, process_index: int | None = None, process_count: int | None = None, *,
                           data_sources: Mapping[str, Sequence[Mapping]] | None = None,
                           source_steps_per_epoch: int | None = None) -> TrainStream:
  """Unlabelled target batches {"image"} from the train split of config.data.target (every image).

  With config.data.val, the images of the held-out validation identities (`create_val_pipelines`) are left
  out, as the original's adversarial val. With config.data.target_restarts and `source_steps_per_epoch` (the
  source stream's steps_per_epoch), the batch of train step k comes from a fresh pass at every source epoch
  and whenever a pass runs out within one (`target_pass`), as the original's loader; otherwise one continuous
  stream of target epochs. The target never merges its test splits (the original's combineall=False here).
  """
  restart_every = source_steps_per_epoch if config.data.target_restarts else None
  target = config.data.target
  splits = ("train", *extra_train_splits(config, target, combineall=False))
  return _train_stream(config, target, splits, lambda labels: _target_examples(config, labels, splits), False,
                       _TARGET_STREAM, process_index, process_count, data_sources, restart_every)


@dataclasses.dataclass
class EvalStream:
  """A split in record order as padded batches; iterate it as often as needed."""
  batches: grain.MapDataset  # batch k of this process at index k
  num_batches: int  # the same on every process
  num_images: int
  batch_size: int  # per process
  labels: SplitLabels  # the whole split's pids, camids and file names (record order)
  num_workers: int = 0
  prefetch: int = 1

  def __iter__(self):
    return iter(_to_iter(self.batches, self.num_workers, self.prefetch))

  def __len__(self):
    return self.num_batches


def create_eval_pipeline(config, dataset_name: str, split: str, batch_size: int | None = None,
                         process_index: int | None = None, process_count: int | None = None, *,
                         records: Sequence[Mapping] | None = None, labels: SplitLabels | None = None,
                         transform: grain.transforms.Map | None = None) -> EvalStream:
  """Batches {"image", "pid", "camid", "mask", "index"} of a split, unaugmented, in record order.

  Global batch k holds images k*B .. k*B+B-1 (B = batch_size, default config.eval.batch_size); process p
  gets its p-th slice. The last batch is padded (mask False, index/pid/camid -1), so with the mask every
  image counts exactly once across processes. `records` replaces reading the TFDS split (`labels`, theirs
  when the caller has read them already), `transform` the config's eval transform (decode + resize).
  """
  process_index, process_count = _process_grid(process_index, process_count)
  global_batch = config.eval.batch_size if batch_size is None else batch_size
  local_batch = _local_batch_size(global_batch, process_count, "The evaluation batch size")
  if records is None:
    records = _split_records(config, dataset_name, (split,), None)[split]
  elif len(records) == 0:
    raise ValueError(f"Split {split!r} of dataset {dataset_name!r} is empty.")
  labels = read_labels(records) if labels is None else labels
  num_batches = -(-len(labels) // global_batch)
  data = config.data
  batches = (
      _EvalRecords(records, labels, num_batches * global_batch, data.height, data.width)
      .map(transform or transforms_lib.eval_transform(config))
      .batch(local_batch, drop_remainder=True, batch_fn=_StackAndNormalize(data.mean, data.std))
  )[process_index::process_count]
  return EvalStream(batches, num_batches, len(labels), local_batch, labels, data.num_workers, data.prefetch)


class _RecordSubset(Sequence):
  """Some records of one split, or of several, in the given order, as a random-access data source: record k
  is `sources[split_index[k]][indices[k]]` (`sources` one split's records when `split_index` is None)."""

  def __init__(self, sources, indices: np.ndarray, split_index: np.ndarray | None = None):
    self._sources = [sources] if split_index is None else list(sources)
    self._indices = np.asarray(indices, np.int64)
    self._split_index = np.zeros(len(self._indices), np.int64) if split_index is None else split_index

  def labels(self, source_labels: Sequence[SplitLabels]) -> SplitLabels:
    """The subset's labels from those of its sources (the same order as `sources`; one for one split)."""
    offsets = np.cumsum([0] + [len(labels) for labels in source_labels[:-1]])
    whole = SplitLabels(*(np.concatenate([getattr(labels, field) for labels in source_labels])
                          for field in ("pids", "camids", "filenames")))
    return whole.take(offsets[self._split_index] + self._indices)

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, index):
    return self._sources[int(self._split_index[index])][int(self._indices[index])]

  def __getitems__(self, indices):
    out = [None] * len(indices)
    by_split = {}
    for position, index in enumerate(indices):
      by_split.setdefault(int(self._split_index[index]), []).append((position, int(self._indices[index])))
    for split, items in by_split.items():
      source, keys = self._sources[split], [key for _, key in items]
      getitems = getattr(source, "__getitems__", None)
      for (position, _), record in zip(items, getitems(keys) if getitems else [source[k] for k in keys]):
        out[position] = record
    return out


def val_query_index(labels: SplitLabels, seed: int) -> np.ndarray:
  """The original's `_prepare_val`: one image per (identity, camera), sorted. The original takes the first in
  its list order (a glob, or a random sample); the first by file name would always pick GTA's day sequences
  and earliest frames, so each is drawn with `seed` instead."""
  shuffled = np.random.default_rng([seed, _VAL_QUERY_SALT]).permutation(len(labels))
  keys = np.stack([labels.pids[shuffled], labels.camids[shuffled].astype(np.int64)], axis=1)
  _, first = np.unique(keys, axis=0, return_index=True)
  return np.sort(shuffled[first])


def val_name(config) -> str:
  """The name the validation results go under (eval/<name>.json): "<target>-val", or "<source>-val" without a
  target."""
  return f"{val_dataset(config)}-val"


def create_val_pipelines(config, batch_size: int | None = None, process_index: int | None = None,
                         process_count: int | None = None, *,
                         data_sources: Mapping[str, Sequence[Mapping]] | None = None,
                         ) -> dict[str, EvalStream]:
  """{"query", "gallery"}: the validation streams of config.data.val, as `create_eval_pipeline` batches them.

  The dataset is `val_dataset(config)`: the target (the original's adversarial val), or the source without
  one. The gallery is every train-split image (after n_samples for the source, in record order) of the
  identities its training stream holds out, the query one image of each of their cameras drawn with
  config.seed (the original's val_query, whose images stay in val_gallery too; the same-camera rule of
  evaluation drops them there). Labels are the dataset's own pids.
  """
  if not config.data.val:
    raise ValueError("create_val_pipelines needs config.data.val=True (validation identities held out).")
  name = val_dataset(config)
  # The held-out draw depends on the train split alone (build_examples draws it first), so reading that split
  # gives the identities the training stream leaves out.
  records = _split_records(config, name, ("train",), data_sources)["train"]
  labels = read_labels(records)
  examples, stream = ((_target_examples, _TARGET_STREAM) if name == config.data.target
                      else (_source_examples, _SOURCE_STREAM))
  held_out = examples(config, {"train": labels}, ("train",)).val_record_index
  gallery = _RecordSubset(records, held_out)
  gallery_labels = gallery.labels([labels])
  query = _RecordSubset(gallery, val_query_index(gallery_labels, _seed_for(config, stream)))
  return {split: create_eval_pipeline(config, val_name(config), f"val_{split}", batch_size, process_index,
                                      process_count, records=subset, labels=subset_labels)
          for split, subset, subset_labels in (("query", query, query.labels([gallery_labels])),
                                               ("gallery", gallery, gallery_labels))}


def create_target_train_pipeline(config, batch_size: int, num_devices: int, process_index: int | None = None,
                                 process_count: int | None = None, *,
                                 data_sources: Mapping[str, Sequence[Mapping]] | None = None) -> EvalStream:
  """The images the target stream trains on (every train-split image but the held-out validation
  identities'), unaugmented and in record order, batched as `create_eval_pipeline` does: what
  config.eval.adabn re-estimates R's BatchNorm statistics on. Batches hold `batch_size` images or, for a
  target with fewer, as many of its images as split over `num_devices`; fewer than 2 is a ConfigError."""
  target = config.data.target
  splits = ("train", *extra_train_splits(config, target, combineall=False))
  records = _split_records(config, target, splits, data_sources)
  split_labels = [read_labels(records[split]) for split in splits]
  examples = _target_examples(config, dict(zip(splits, split_labels)), splits)
  subset = _RecordSubset([records[split] for split in splits], examples.record_index, examples.split_index)
  num_images = len(subset)
  batch_size = min(batch_size, num_images - num_images % num_devices)
  if batch_size < 2:
    raise ConfigError(f"config.eval.adabn: the target {target!r} has {num_images} training images, too few "
                      f"for BatchNorm statistics over {num_devices} device(s); set config.eval.adabn=False.")
  return create_eval_pipeline(config, target, "train", batch_size, process_index, process_count,
                              records=subset, labels=subset.labels(split_labels))


def split_labels(config, dataset_name: str, split: str) -> SplitLabels:
  """pids, camids and file names of a split without building a pipeline."""
  return read_labels(_split_records(config, dataset_name, (split,), None)[split])

