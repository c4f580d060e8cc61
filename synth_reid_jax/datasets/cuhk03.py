"""CUHK03 from the original release: images extracted from cuhk-03.mat, splits from the 767/700 protocol.

The release stores every image inside one MATLAB v7.3 (HDF5) file: for each of the 5 camera pairs a cell array
(identities x 10) whose first 5 cells are views of the first camera and the last 5 of the second; empty cells
mark missing views. The new protocol (Zhong et al., CVPR 2017) lists, per image type, a file list with labels
and 1-based train/query/gallery indices. As torchreid does, images are written out as PNGs named
`<pair>_<person:03d>_<view>_<image:02d>.png` (all 1-based) and the splits are read from the protocol file; the
camera of an image is its view (0 or 1).
"""

import os
import shutil
import tempfile

import numpy as np

from synth_reid_jax.datasets import images, parsing
from synth_reid_jax.errors import DatasetError, DatasetMissingError

RELEASE_FOLDER = "cuhk03_release"
RELEASE_MAT = "cuhk-03.mat"
# torchreid keeps everything under <root>/cuhk03; the release may also sit directly in manual_dir.
BASE_DIRS = ("cuhk03", "")
IMAGES_PER_PERSON = 10  # cells per identity in cuhk-03.mat
VIEWS_PER_CAMERA = 5  # cells 1-5 are the first camera of the pair, 6-10 the second
DONE_MARKER = ".extracted"
DOC = "cuhk03.md"


def protocol_file(image_type: str) -> str:
  return f"cuhk03_new_protocol_config_{image_type}.mat"


def find_release(manual_dir: str, image_type: str) -> tuple[str, str] | None:
  """(cuhk-03.mat, protocol .mat) of the original release under manual_dir, or None when there is none."""
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  for base in BASE_DIRS:
    base_dir = os.path.join(manual_dir, base)
    mat_path = os.path.join(base_dir, RELEASE_FOLDER, RELEASE_MAT)
    if not os.path.isfile(mat_path):
      continue
    candidates = [os.path.join(base_dir, protocol_file(image_type)),
                  os.path.join(base_dir, RELEASE_FOLDER, protocol_file(image_type))]
    for config_path in candidates:
      if os.path.isfile(config_path):
        return mat_path, config_path
    raise DatasetMissingError(
        f"cuhk03/{image_type}: found {mat_path} but not the new-protocol split file (looked for "
        f"{' and '.join(candidates)}). Put {protocol_file(image_type)} next to the {RELEASE_FOLDER} folder. "
        f"See {parsing.DOCS_DIR}/{DOC}."
    )
  return None


def image_name(pair: int, person: int, cell: int) -> str:
  """torchreid's name of an extracted image (all arguments 0-based)."""
  view = 1 if cell < VIEWS_PER_CAMERA else 2
  return f"{pair + 1:01d}_{person + 1:03d}_{view:01d}_{cell + 1:02d}.png"


def extract_images(mat_path: str, image_type: str, out_dir: str) -> str:
  """Writes every `image_type` image of cuhk-03.mat as a PNG into out_dir (once); returns out_dir."""
  if os.path.isfile(os.path.join(out_dir, DONE_MARKER)):
    return out_dir
  import h5py  # only this route needs it

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp", dir=parent)
  try:
    with h5py.File(mat_path, "r") as mat:
      if image_type not in mat:
        raise DatasetError(f"{mat_path} has no '{image_type}' images; is it the CUHK03 release cuhk-03.mat?")

      def deref(ref):
        # MATLAB stores arrays column-major: transposing gives (persons, 10) cells and (H, W, 3) images.
        return mat[ref][()].T

      for pair, pair_ref in enumerate(np.ravel(mat[image_type][()])):
        cells = deref(pair_ref)
        for person in range(cells.shape[0]):
          written = 0
          for cell, ref in enumerate(cells[person, :IMAGES_PER_PERSON]):
            image = deref(ref)
            if image.size == 0 or image.ndim < 3:
              continue  # an empty cell: this view is missing for this person
            with open(os.path.join(tmp_dir, image_name(pair, person, cell)), "wb") as f:
              f.write(images.encode_png(np.ascontiguousarray(image, dtype=np.uint8)))
            written += 1
          if not written:
            raise DatasetError(
                f"{mat_path}: camera pair {pair + 1}, person {person + 1} has no '{image_type}' image.")
    open(os.path.join(tmp_dir, DONE_MARKER), "w").close()
    if os.path.isdir(out_dir):  # an interrupted earlier extraction
      shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
  finally:
    if os.path.isdir(tmp_dir):
      shutil.rmtree(tmp_dir)
  return out_dir


def protocol_splits(config_path: str, images_dir: str, image_type: str) -> dict[str, list[parsing.Sample]]:
  """train/query/gallery samples listed by a new-protocol file, with the labels as identities."""
  from scipy.io import loadmat

  config = loadmat(config_path)
  missing = [k for k in ("filelist", "labels", "train_idx", "query_idx", "gallery_idx") if k not in config]
  if missing:
    raise DatasetError(f"{config_path} lacks {missing}; is it cuhk03_new_protocol_config_{image_type}.mat?")
  names = [str(np.ravel(entry)[0]) for entry in config["filelist"].flatten()]
  labels = config["labels"].flatten()
  splits = {}
  for split, key in (("train", "train_idx"), ("query", "query_idx"), ("gallery", "gallery_idx")):
    samples = []
    for index in config[key].flatten().astype(np.int64) - 1:  # the protocol's indices are 1-based
      name = names[index]
      path = os.path.join(images_dir, name)
      try:
        view = int(name.split("_")[2])
      except (IndexError, ValueError):
        raise DatasetError(
            f"cuhk03/{image_type}: cannot parse the view of {name} listed in {config_path}.") from None
      if not os.path.isfile(path):
        raise DatasetMissingError(
            f"cuhk03/{image_type}: {name} is listed in {config_path} but was not extracted from "
            f"{RELEASE_MAT} (looked in {images_dir}). Do the two files come from the same release?"
        )
      samples.append(parsing.Sample(path=path, pid=int(labels[index]), camid=view - 1, filename=name))
    if not samples:
      raise DatasetError(f"cuhk03/{image_type}: split '{split}' is empty in {config_path}.")
    splits[split] = samples
  return splits
