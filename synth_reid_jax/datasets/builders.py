"""TFDS builders of the re-ID datasets: array_record files with image bytes, pid, camid and filename.

Every builder turns a dataset's `Sample` lists (see parsing.py) into the splits train, query and gallery (and
MSMT17's val, its list_val.txt), in file-name order. Images are stored as encoded bytes (JPEG/PNG, byte for
byte when RGB) and are fully decoded once while building, so a broken file fails here. Building needs neither
TensorFlow nor the `tfds` CLI: `get_builder` (or `python -m synth_reid_jax.datasets`) prepares a dataset on
first use.

The builders write their records shard by shard in the order given (tfds.core.ShardBasedBuilder). TFDS's
GeneratorBasedBuilder sorts a split in memory up to 1 GB and beyond that spills it to buckets written with
TensorFlow, which this project does not install: a large split (MSMT17's gallery holds 82,161 images) would
fail there.

A prepared dataset is checked each time it is opened (its JSON files parse, every shard is there and holds the
records dataset_info.json lists) and every record read goes through `CheckedSource`: a damaged or half-built
folder ends in one DatasetError naming the dataset, its folder and the fix (delete the folder, rerun to
rebuild). One process builds a dataset at a time (`build_lock`); the others wait and then use its result.
"""

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from google.protobuf import json_format

from synth_reid_jax.datasets import cuhk03, images, msmt17, parsing, toy
from synth_reid_jax.errors import DatasetError, DatasetMissingError

FILE_FORMAT = "array_record"  # random access without TensorFlow (grain, as_data_source)
# Image bytes per array_record shard: TFDS keeps a whole shard's examples in memory while writing it.
SHARD_BYTES = 256 << 20
# What reading a prepared dataset's files raises when they are damaged: array_record/Riegeli errors
# (RuntimeError), protobuf and JSON parse errors, a missing or unreadable file.
READ_ERRORS = (RuntimeError, OSError, ValueError, KeyError, EOFError, json_format.Error)
# Errors of the storage a dataset is built into (full, read-only, not a folder), which the user fixes there.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                  errno.EEXIST)
# Records read at a time while summarising a split.
SUMMARY_CHUNK = 1024
MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "The dataset's licence forbids redistribution: request it from its authors and unpack it under "
    "manual_dir as released. {doc} lists where to ask and the folder layout."
)


class FileName(tfds.features.Text):
  """A file name that reads back as `str` (tfds.features.Text reads back as bytes without TensorFlow)."""

  def decode_example_np(self, example_data):
    return example_data.decode("utf-8") if isinstance(example_data, bytes) else example_data


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "pid": np.int64,  # the original identity number (0 = distractor)
      "camid": np.int64,  # 0-based camera
      "filename": FileName(),  # name of the image file in its split folder
  })


class ReidBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Common machinery: splits from `_samples`, one example per image, in file-name order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DOC = ""  # page under datasets/
  HOMEPAGE = ""
  CITATION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup of a packaged builder's source imports `importlib_resources`, which it does not
    # install on Python >= 3.9; the source file is all it needs (to look for an optional checksums.tsv).
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip(),
        features=features(),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        disable_shuffling=True,  # records stay in file-name order, so indices are reproducible
        metadata=tfds.core.MetadataDict(self._metadata()),
    )

  def _metadata(self) -> dict:
    return {}

  def _samples(self, dl_manager) -> dict[str, list[parsing.Sample]]:
    raise NotImplementedError

  @classmethod
  def expected_layout(cls, config_name: str | None) -> str:
    """What manual_dir should hold, for error messages."""
    return ""

  def _shard_iterators_per_split(self, dl_manager):
    samples = self._samples(dl_manager)  # parse everything (and fail) before writing anything
    return {
        split: [functools.partial(self._generate_examples, shard)
                for shard in shards(in_file_name_order(self._full_name(), split, samples[split]))]
        for split in samples  # parsing.SPLITS; MSMT17 adds "val"
    }

  def _full_name(self) -> str:
    return f"{self.name}/{self.builder_config.name}" if self.builder_config else self.name

  def _generate_examples(self, samples):
    for index, sample in enumerate(samples):
      yield index, {
          "image": images.read_checked_image(sample.path),
          "pid": sample.pid,
          "camid": sample.camid,
          "filename": sample.filename,
      }


def in_file_name_order(name: str, split: str, samples: list[parsing.Sample]) -> list[parsing.Sample]:
  """The samples sorted by file name, which must be unique within a split (it identifies a record)."""
  ordered = sorted(samples, key=lambda sample: sample.filename)
  for a, b in zip(ordered, ordered[1:]):
    if a.filename == b.filename:
      raise DatasetError(
          f"{name}: split '{split}' holds two images named {a.filename} ({a.path} and {b.path}). Remove or "
          "rename one of them."
      )
  return ordered


def shards(samples: list[parsing.Sample]) -> list[list[parsing.Sample]]:
  """Consecutive runs of samples with at most SHARD_BYTES of image files each (or a single larger image)."""
  runs, run, size = [], [], 0
  for sample in samples:
    nbytes = os.path.getsize(sample.path)
    if run and size + nbytes > SHARD_BYTES:
      runs.append(run)
      run, size = [], 0
    run.append(sample)
    size += nbytes
  if run:
    runs.append(run)
  return runs


class ManualReidBuilder(ReidBuilder, skip_registration=True):
  """A real dataset in its released folder layout under manual_dir."""

  LAYOUT: parsing.FolderLayout

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    doc = f"{parsing.DOCS_DIR}/{cls.DOC}"
    cls.MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS.format(doc=doc)

  def _samples(self, dl_manager):
    return parsing.parse_splits(self.LAYOUT, os.fspath(dl_manager.manual_dir))

  @classmethod
  def expected_layout(cls, config_name):
    return cls.LAYOUT.expected_layout()


class Market1501(ManualReidBuilder):
  """Market-1501 (Zheng et al., ICCV 2015): 1501 identities, 6 cameras; distractors (pid 0) in the gallery."""

  LAYOUT = parsing.MARKET1501
  DOC = LAYOUT.doc
  HOMEPAGE = "https://zheng-lab-anu.github.io/Project/project_reid.html"
  CITATION = """@inproceedings{zheng2015scalable,
  title={Scalable Person Re-identification: A Benchmark},
  author={Zheng, Liang and Shen, Liyue and Tian, Lu and Wang, Shengjin and Wang, Jingdong and Tian, Qi},
  booktitle={ICCV}, year={2015}}"""


class DukemtmcReid(ManualReidBuilder):
  """DukeMTMC-reID (Ristani et al. 2016, Zheng et al. 2017): 1404 identities (+408 distractors), 8 cameras."""

  LAYOUT = parsing.DUKEMTMC_REID
  DOC = LAYOUT.doc
  HOMEPAGE = "https://github.com/layumi/DukeMTMC-reID_evaluation"
  CITATION = """@inproceedings{zheng2017unlabeled,
  title={Unlabeled Samples Generated by GAN Improve the Person Re-identification Baseline in vitro},
  author={Zheng, Zhedong and Zheng, Liang and Yang, Yi}, booktitle={ICCV}, year={2017}}"""


class GtaSynthreid(ManualReidBuilder):
  """GTA_synthReid: synthetic pedestrians rendered in GTA V, 19 cameras, day and night sequences."""

  LAYOUT = parsing.GTA_SYNTHREID
  DOC = LAYOUT.doc
  HOMEPAGE = "https://github.com/RoboTuan/synth-reid"


class Cuhk03(ReidBuilder):
  """CUHK03 (Li et al., CVPR 2014), 767/700 protocol (Zhong et al., CVPR 2017); detected or labeled boxes."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="detected", description="Boxes found by a pedestrian detector."),
      tfds.core.BuilderConfig(name="labeled", description="Boxes drawn by hand."),
  ]
  DOC = cuhk03.DOC
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS.format(doc=f"{parsing.DOCS_DIR}/{cuhk03.DOC}")
  HOMEPAGE = "https://github.com/zhunzhong07/person-re-ranking/tree/master/CUHK03-NP"
  CITATION = """@inproceedings{li2014deepreid,
  title={DeepReID: Deep Filter Pairing Neural Network for Person Re-identification},
  author={Li, Wei and Zhao, Rui and Xiao, Tong and Wang, Xiaogang}, booktitle={CVPR}, year={2014}}"""

  def _samples(self, dl_manager):
    image_type = self.builder_config.name
    manual_dir = os.fspath(dl_manager.manual_dir)
    layout = parsing.cuhk03_np_layout(image_type)
    if any(os.path.isdir(os.path.join(manual_dir, root)) for root in layout.roots):
      logging.info("cuhk03/%s: reading the cuhk03-np folders", image_type)
      return parsing.parse_splits(layout, manual_dir)
    release = cuhk03.find_release(manual_dir, image_type)
    if release is None:
      raise DatasetMissingError(
          f"cuhk03/{image_type}: found neither the cuhk03-np folders nor the original release under "
          f"manual_dir {manual_dir}. Expected {self.expected_layout(image_type)}\n{layout.help()}"
      )
    mat_path, config_path = release
    out_dir = os.path.join(os.fspath(dl_manager.download_dir), "cuhk03", f"images_{image_type}")
    logging.info("cuhk03/%s: extracting images from %s into %s", image_type, mat_path, out_dir)
    cuhk03.extract_images(mat_path, image_type, out_dir)
    return cuhk03.protocol_splits(config_path, out_dir, image_type)

  @classmethod
  def expected_layout(cls, config_name):
    return (f"either\n{parsing.cuhk03_np_layout(config_name).expected_layout()}\nor\n"
            f"  {cuhk03.RELEASE_FOLDER}/{cuhk03.RELEASE_MAT} and {cuhk03.protocol_file(config_name)} "
            "(both may sit in a cuhk03/ folder)")


class Msmt17(ReidBuilder):
  """MSMT17 (Wei et al., CVPR 2018): 4,101 identities, 15 cameras; train is list_train, val list_val."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release (train = list_train + list_val).",
                   "1.1.0": "train = list_train alone, as torchreid; list_val is the split 'val'."}
  DOC = msmt17.DOC
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS.format(doc=f"{parsing.DOCS_DIR}/{msmt17.DOC}")
  HOMEPAGE = "http://www.pkuvmc.com/publications/msmt17.html"
  CITATION = """@inproceedings{wei2018person,
  title={Person Transfer GAN to Bridge Domain Gap for Person Re-Identification},
  author={Wei, Longhui and Zhang, Shiliang and Gao, Wen and Tian, Qi}, booktitle={CVPR}, year={2018}}"""

  def _samples(self, dl_manager):
    return msmt17.parse_splits(os.fspath(dl_manager.manual_dir))

  @classmethod
  def expected_layout(cls, config_name):
    return msmt17.expected_layout()


class ReidToy(ReidBuilder):
  """reid_toy: procedural pedestrians; "synthetic" is flat-shaded, "real" looks like camera footage."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="synthetic", description="Clean, flat-shaded renders (the source)."),
      tfds.core.BuilderConfig(name="real", description="The same kind of people, rendered like footage."),
  ]
  DOC = "reid_toy.md"

  def __init__(self, *, toy_config: toy.ToyConfig | None = None, **kwargs):
    self.toy_config = toy_config or toy.ToyConfig()
    super().__init__(**kwargs)
    self._original_state["toy_config"] = self.toy_config  # so a pickled builder keeps its settings

  def _metadata(self):
    return {"toy_config": self.toy_config.to_json()}

  def _samples(self, dl_manager):
    domain = self.builder_config.name
    out_dir = toy_images_dir(os.fspath(dl_manager.download_dir), self.toy_config, domain)
    toy.write_domain(self.toy_config, domain, out_dir)
    return parsing.parse_splits(parsing.toy_layout(domain), os.path.dirname(out_dir))


def toy_images_dir(download_dir: str, config: toy.ToyConfig, domain: str) -> str:
  """Where a domain's PNGs are written: one folder per distinct ToyConfig, so changed settings regenerate."""
  digest = hashlib.sha256(json.dumps(config.to_json(), sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(download_dir, "reid_toy", digest, domain)


BUILDERS = {
    "gta_synthreid": (GtaSynthreid, None),
    "market1501": (Market1501, None),
    "dukemtmc_reid": (DukemtmcReid, None),
    "cuhk03/detected": (Cuhk03, "detected"),
    "cuhk03/labeled": (Cuhk03, "labeled"),
    "msmt17": (Msmt17, None),
    "reid_toy/synthetic": (ReidToy, "synthetic"),
    "reid_toy/real": (ReidToy, "real"),
}
DATASET_NAMES = tuple(BUILDERS)


def get_builder(name: str, data_dir: str, manual_dir: str | None = None,
                toy_config: toy.ToyConfig | None = None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of a dataset, building it into data_dir on first use.

  A prepared dataset is checked (`check_prepared`) before it is returned. Building holds the dataset's
  `build_lock`: a second process asking for the same dataset meanwhile waits, then uses the result.

  Args:
    name: one of DATASET_NAMES.
    data_dir: where prepared datasets live (`<data_dir>/<name>/<version>`).
    manual_dir: where the downloaded real datasets sit in their released layouts (unused for reid_toy and
      for datasets already prepared).
    toy_config: settings of reid_toy (default ToyConfig()); a prepared reid_toy drawn with other settings
      is rebuilt.
  """
  if name not in BUILDERS:
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.")
  cls, config_name = BUILDERS[name]
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  folder = os.path.join(data_dir, name, str(cls.VERSION))
  extra = {}
  if cls is ReidToy:
    toy_config = toy_config or toy.ToyConfig()
    extra = {"toy_config": toy_config}
  make = lambda: _open(name, folder, lambda: cls(config=config_name, data_dir=data_dir,
                                                  file_format=FILE_FORMAT, **extra))

  def prepared(strict):
    """The builder of the prepared folder, or None. A builder reads dataset_info.json when it is made, so
    it is made only once the folder is there (a build renames a finished folder into place). `strict`: a
    folder that looks damaged raises (the build lock is held, or no build could follow); else None, and it
    is looked at again with the lock held (another process may be replacing it)."""
    if not os.path.isdir(folder):
      return None
    try:
      builder = make()
      if not builder.is_prepared():
        # TFDS renames a finished build into place: this folder was damaged since.
        raise damaged_error(name, folder, f"it holds no {tfds.core.constants.DATASET_INFO_FILENAME}")
      if cls is ReidToy and _metadata(builder, name, folder).get("toy_config") != toy_config.to_json():
        return None
      check_prepared(builder, name)
    except DatasetError:
      if strict:
        raise
      return None
    return builder

  builder = prepared(strict=False)
  if builder is not None:
    return builder
  download_config = None
  if cls is not ReidToy:
    if manual_dir is None:
      builder = prepared(strict=True)  # built meanwhile; a damaged folder is named as such
      if builder is not None:
        return builder
      raise DatasetError(
          f"{name} is not prepared in {data_dir} yet and no manual_dir was given: pass the folder holding "
          f"the downloaded dataset. See {parsing.DOCS_DIR}/{cls.DOC}."
      )
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
      raise DatasetMissingError(
          f"{name}: manual_dir {manual_dir} does not exist or is empty. Unpack the dataset there as "
          f"released; expected layout under manual_dir:\n{cls.expected_layout(config_name)}\n"
          f"See {parsing.DOCS_DIR}/{cls.DOC} for where to request it."
      )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  with build_lock(name, data_dir):
    builder = prepared(strict=True)  # another process may have built it while this one waited for the lock
    if builder is not None:
      return builder
    if os.path.isdir(folder):  # a reid_toy drawn with other settings
      logging.info("%s: rebuilding, its ToyConfig changed", name)
      shutil.rmtree(folder)
    builder = make()
    _remove_unfinished_builds(name, folder)
    with _storage_errors(name, data_dir):
      builder.download_and_prepare(download_config=download_config)
    check_prepared(builder, name)
  return builder


def _open(name, folder, make):
  """make() -> builder; a builder cannot be made when the dataset_info.json it reads back is damaged."""
  try:
    return make()
  except READ_ERRORS as e:
    if not os.path.isdir(folder):
      raise
    raise damaged_error(name, folder, f"{tfds.core.constants.DATASET_INFO_FILENAME}: {_reason(e)}") from e


def _metadata(builder, name, folder) -> dict:
  try:
    return dict(builder.info.metadata or {})
  except READ_ERRORS as e:
    raise damaged_error(name, folder, _reason(e)) from e


def _reason(error: BaseException) -> str:
  """The first line of an error's message (the libraries' messages run on for lines), at most 160 chars."""
  text = (str(error).strip().splitlines() or [""])[0].strip().rstrip(".")
  if not text:
    return f"{type(error).__name__} without a message"
  return text if len(text) <= 160 else text[:157] + "..."


def damaged_error(name: str, folder: str, reason: str) -> DatasetError:
  """The one-line error of a prepared dataset that cannot be read, with the fix."""
  source = "generated again" if name.startswith("reid_toy") else "built again from manual_dir"
  return DatasetError(
      f"Dataset {name} in {folder} cannot be read: {reason}. The folder is damaged or was not completely "
      f"built; delete it (rm -r {folder}) and rerun: the dataset is {source}.")


def check_prepared(builder: tfds.core.DatasetBuilder, name: str) -> None:
  """Raises damaged_error unless the prepared folder's JSON files parse and every split's shards are there,
  each holding as many records as dataset_info.json lists (only the shards' footers are read)."""
  folder = os.fspath(builder.data_dir)
  try:
    for json_file in sorted(glob.glob(os.path.join(folder, "*.json"))):
      try:
        with open(json_file) as f:
          json.load(f)
      except READ_ERRORS as e:
        raise DatasetError(f"{os.path.basename(json_file)}: {_reason(e)}") from e
    splits = builder.info.splits
    missing = [split for split in parsing.SPLITS if split not in splits]
    if missing:
      raise DatasetError(f"dataset_info.json lists no split {missing[0]!r}")
    for split in splits:  # parsing.SPLITS, and those a dataset adds
      info = splits[split]
      paths, lengths = [os.fspath(p) for p in info.filepaths], info.shard_lengths
      if len(paths) != len(lengths):
        raise DatasetError(f"dataset_info.json lists {len(lengths)} shards of split {split!r}, "
                           f"{len(paths)} files")
      for path, length in zip(paths, lengths):
        if not os.path.isfile(path):
          raise DatasetError(f"the shard {os.path.basename(path)} is missing")
        try:
          reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
          try:
            stored = reader.num_records()
          finally:
            reader.close()
        except READ_ERRORS as e:
          raise DatasetError(f"{os.path.basename(path)}: {_reason(e)}") from e
        if stored != length:
          raise DatasetError(f"{os.path.basename(path)} holds {stored} records, dataset_info.json lists "
                             f"{length}")
  except DatasetError as e:
    raise damaged_error(name, folder, str(e)) from e
  except READ_ERRORS as e:
    raise damaged_error(name, folder, _reason(e)) from e


class CheckedSource(Sequence):
  """The records of a prepared split (a TFDS data source); a record that cannot be read raises
  damaged_error, in this process or in a grain worker process (grain hands it on as it is)."""

  def __init__(self, source: Sequence, name: str, folder: str, split: str):
    self._source, self.name, self.folder, self.split = source, name, folder, split

  def __len__(self):
    return len(self._source)

  def _damaged(self, keys, error):
    which = f"record {keys[0]}" if len(keys) == 1 else f"records {keys[0]}..{keys[-1]}"
    return damaged_error(self.name, self.folder, f"{which} of split {self.split!r}: {_reason(error)}")

  def __getitem__(self, key):
    try:
      return self._source[key]
    except READ_ERRORS as e:
      raise self._damaged([key], e) from e

  def __getitems__(self, keys):
    keys = list(keys)
    try:
      getitems = getattr(self._source, "__getitems__", None)
      return getitems(keys) if getitems is not None else [self._source[k] for k in keys]
    except READ_ERRORS as e:
      raise self._damaged(keys, e) from e

  def __repr__(self):
    return f"CheckedSource({self.name}/{self.split}, {len(self)} records)"


def open_split(builder: tfds.core.DatasetBuilder, split: str) -> CheckedSource:
  """A prepared split's records, images as encoded bytes (decoded by the pipeline)."""
  name = builder._full_name()
  folder = os.fspath(builder.data_dir)
  try:
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  except READ_ERRORS as e:
    raise damaged_error(name, folder, _reason(e)) from e
  return CheckedSource(source, name, folder, split)


# --- One build at a time ------------------------------------------------------------------------------


def _describe_holder(fd) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    holder = json.loads(os.read(fd, 4096).decode(errors="replace") or "null")
  except ValueError:
    holder = None
  if not isinstance(holder, dict):
    return "another process"
  return f"process {holder.get('pid')} on {holder.get('host')}"


@contextlib.contextmanager
def build_lock(name: str, data_dir: str):
  """Holds `<data_dir>/<name>.lock` (flock) while this process builds the dataset; a process that finds it
  held waits for it, saying so once. The operating system releases the lock when its holder dies."""
  path = os.path.join(data_dir, f"{name}.lock")
  with _storage_errors(name, data_dir):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.warning("%s: %s is building it into %s; waiting for it to finish", name, _describe_holder(fd),
                      data_dir)
      start = time.monotonic()
      fcntl.flock(fd, fcntl.LOCK_EX)
      logging.warning("%s: the other build ended after %.0f s", name, time.monotonic() - start)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)
    os.close(fd)


def _remove_unfinished_builds(name: str, folder: str):
  """Removes the temporary folders of builds that were stopped (TFDS writes `incomplete.<random>_<version>`
  and renames it when done); called with the build lock held, so none of them is still being written."""
  parent, version = os.path.split(folder)
  for leftover in glob.glob(os.path.join(parent, f"{tfds.core.constants.INCOMPLETE_PREFIX}*_{version}")):
    logging.warning("%s: removing %s, left by a build that was stopped", name, leftover)
    shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _storage_errors(name: str, data_dir: str):
  """Errors of data_dir's storage (full, read-only, not a folder) as one DatasetError with the fix: OS errors,
  and the array_record writer's RuntimeErrors that carry one."""
  fix = ("Free space or choose a writable folder (config.data.data_dir / --data_dir) and rerun; nothing "
         "half-built is kept.")
  try:
    yield
  except OSError as e:
    inside = e.filename is None or os.path.abspath(os.fsdecode(e.filename)).startswith(data_dir)
    if e.errno not in STORAGE_ERRNOS or not inside:
      raise
    where = os.fsdecode(e.filename) if e.filename else data_dir
    raise DatasetError(f"Cannot build {name} into data_dir {data_dir}: {where}: {e.strerror}. {fix}") from e
  except RuntimeError as e:
    reason = next((os.strerror(n) for n in STORAGE_ERRNOS if os.strerror(n) in str(e)), None)
    if reason is None:
      raise
    raise DatasetError(f"Cannot build {name} into data_dir {data_dir}: {reason}. {fix}") from e


def summarize(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, int]]:
  """torchreid's numbers of each split (ids, images, cameras), read from the prepared records."""
  summary = {}
  for split in parsing.SPLITS:
    source = open_split(builder, split)
    pids, camids = [], []
    for start in range(0, len(source), SUMMARY_CHUNK):
      for record in source.__getitems__(range(start, min(start + SUMMARY_CHUNK, len(source)))):
        pids.append(record["pid"])
        camids.append(record["camid"])
    summary[split] = parsing.split_summary(pids, camids)
  return summary
