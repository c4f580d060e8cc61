"""MSMT17 as torchreid reads it: list files give each split's images and identities, file names the cameras.

The release keeps its images in per-identity folders under a train and a test folder (V2, with blurred
faces, only renames them) and lists every split in a text file next to them, one `<relative path> <pid>` per
line. Identities are 0-based and numbered separately in train and test; the camera is the third `_` field of
the file name (`0000_000_01_0303morning_0015_0.jpg`: identity 0, image 0, camera 1, day and time slot, frame,
box). Like torchreid, only listed images are read and the pid comes from the list, not from the name. As
torchreid, train is list_train.txt alone; list_val.txt (more images of the train identities) is a fourth
split, "val", that the input pipeline adds to training only on request (input_pipeline.EXTRA_TRAIN_SPLITS).
"""

import os

from synth_reid_jax.datasets import parsing
from synth_reid_jax.errors import DatasetError, DatasetMissingError

NAME = "msmt17"
DOC = "msmt17.md"
# Release folder -> (train images, test images), in the order torchreid looks for them.
VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
# torchreid keeps the release under <root>/msmt17; it may also sit directly in manual_dir.
BASE_DIRS = ("msmt17", "")
# The list file of each split and whether its paths are relative to the train or the test images. The
# release's training set is list_train + list_val (32,621 images, the number of the MSMT17 paper and of
# torchreid's summary), but torchreid's loader adds list_val only with combineall=True (its note: numbers
# trained with it are not comparable with published ones), so its train split has list_train's 30,248 images:
# so does ours, and list_val is the split "val".
SPLIT_LISTS = {
    "train": ("train", "list_train.txt"),
    "val": ("train", "list_val.txt"),
    "query": ("test", "list_query.txt"),
    "gallery": ("test", "list_gallery.txt"),
}
SPLITS = tuple(SPLIT_LISTS)
LIST_FILES = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
CAMERAS = (1, 15)  # 1-based camera numbers in the file names
CAMERA_FIELD = 2  # index of the camera among the `_`-separated fields of a file name
EXAMPLE_LINE = "0000/0000_000_01_0303morning_0015_0.jpg 0"


def help_text() -> str:
  return f"See {parsing.DOCS_DIR}/{DOC} for where to request the data and how to lay it out."


def expected_layout() -> str:
  name = EXAMPLE_LINE.split()[0]
  return (f"  msmt17/MSMT17_V1/train/{name} ...\n"
          f"  msmt17/MSMT17_V1/test/{name} ...\n"
          f"  msmt17/MSMT17_V1/{{{','.join(LIST_FILES)}}} (lines like '{EXAMPLE_LINE}')\n"
          "  (or MSMT17_V2 with mask_train_v2/ and mask_test_v2/; MSMT17_V1/ or MSMT17_V2/ may also sit "
          "directly in manual_dir)")


def find_release(manual_dir: str) -> tuple[str, str]:
  """(release folder, its key in VERSIONS): the first of msmt17/MSMT17_V1, msmt17/MSMT17_V2, MSMT17_V1, ..."""
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  tried = []
  for base in BASE_DIRS:
    for version in VERSIONS:
      candidate = os.path.join(manual_dir, base, version)
      if os.path.isdir(candidate):
        return candidate, version
      tried.append(candidate)
  raise DatasetMissingError(
      f"{NAME}: no MSMT17 release folder under manual_dir {manual_dir} (looked for {', '.join(tried)}). "
      f"Expected layout under manual_dir:\n{expected_layout()}\n{help_text()}"
  )


def _camera(name: str) -> int | None:
  fields = name.split("_")
  if len(fields) <= CAMERA_FIELD or not fields[CAMERA_FIELD].isdigit():
    return None
  return int(fields[CAMERA_FIELD])


def read_list(list_path: str, images_dir: str) -> list[tuple[parsing.Sample, int]]:
  """(sample, line number) of every line of one list file; raises naming the file and line that is wrong."""
  if not os.path.isfile(list_path):
    raise DatasetMissingError(
        f"{NAME}: missing list file {list_path}. The release has {', '.join(LIST_FILES)} next to its image "
        f"folders; copy them from the unpacked archive. Expected layout under manual_dir:\n"
        f"{expected_layout()}\n{help_text()}"
    )
  entries = []
  with open(list_path) as f:
    for line_number, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue  # a trailing empty line
      where = f"line {line_number} of {list_path}"
      if len(fields) != 2 or not fields[1].isdigit():
        raise DatasetError(
            f"{NAME}: cannot parse {where}: {line.rstrip()!r}. Expected '<image path relative to "
            f"{os.path.basename(images_dir)}/> <identity>', e.g. '{EXAMPLE_LINE}'. Fix or delete the line, "
            f"or restore the file from the release. {help_text()}"
        )
      relative, pid = fields[0], int(fields[1])
      name = os.path.basename(relative)
      camera = _camera(name)
      if camera is None:
        raise DatasetError(
            f"{NAME}: cannot parse the camera of {relative} ({where}): expected names like "
            f"{os.path.basename(EXAMPLE_LINE.split()[0])}, with the camera as the third '_' field. Fix or "
            f"delete the line. {help_text()}"
        )
      if not CAMERAS[0] <= camera <= CAMERAS[1]:
        raise DatasetError(
            f"{NAME}: camera {camera} of {relative} ({where}) is outside {CAMERAS[0]}..{CAMERAS[1]}. Fix or "
            "delete the line."
        )
      path = os.path.join(images_dir, relative)
      if not os.path.isfile(path):
        raise DatasetMissingError(
            f"{NAME}: {relative} ({where}) does not exist: no file {path}. Unpack the whole release, and "
            "keep each version's lists with its own images (V1 lists go with train/ and test/, V2 lists with "
            f"mask_train_v2/ and mask_test_v2/). {help_text()}"
        )
      entries.append((parsing.Sample(path=path, pid=pid, camid=camera - 1, filename=name), line_number))
  return entries


def parse_splits(manual_dir: str) -> dict[str, list[parsing.Sample]]:
  """The train (list_train), val (list_val), query and gallery samples of the release under manual_dir."""
  release, version = find_release(manual_dir)
  image_dirs = dict(zip(("train", "test"), (os.path.join(release, d) for d in VERSIONS[version])))
  for kind, folder in image_dirs.items():
    if not os.path.isdir(folder):
      raise DatasetMissingError(
          f"{NAME}: missing folder {folder} (the {kind} images of {version}). Expected layout under "
          f"manual_dir:\n{expected_layout()}\n{help_text()}"
      )
  splits = {}
  # Records are keyed by file name, and a training image listed twice would train twice (train and val may
  # be merged): a name is checked against every list of its image folder.
  seen = {kind: {} for kind in image_dirs}
  for split, (kind, list_name) in SPLIT_LISTS.items():
    samples = []
    list_path = os.path.join(release, list_name)
    for sample, line_number in read_list(list_path, image_dirs[kind]):
      here = f"line {line_number} of {list_path}"
      if sample.filename in seen[kind]:
        raise DatasetError(
            f"{NAME}: {sample.filename} is listed twice in split '{split}' ({seen[kind][sample.filename]} "
            f"and {here}). Delete one of the lines."
        )
      seen[kind][sample.filename] = here
      samples.append(sample)
    if not samples:
      raise DatasetError(
          f"{NAME}: split '{split}' is empty: {list_name} in {release} lists no image. Restore the list "
          f"files from the release. {help_text()}"
      )
    splits[split] = samples
  return splits
