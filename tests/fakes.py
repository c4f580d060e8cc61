"""Small fake copies of the released re-ID datasets, in their real layouts, for tests.

Each `make_*` writes a tree under a manual_dir and returns the manual_dir. The trees carry what the real
releases carry besides person crops: Market's junk images (pid -1) and distractors (pid 0), Thumbs.db and
readme files, a hidden macOS `._` file, a file of another image format. The `*_EXPECTED` dicts hold
torchreid's summary of each fake (ids, images, cameras per split), worked out by hand from the file lists.
"""

import os
import zlib

import h5py
import numpy as np
from PIL import Image
from scipy.io import savemat

IMAGE_SIZE = (16, 8)  # height, width of every fake crop

# --- Market-1501 --------------------------------------------------------------------------------------------
# train keeps pid 0 (torchreid keeps it outside the gallery too) and drops the junk -1.
MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg", "0002_c2s1_000301_01.jpg",
        "0007_c3s3_077419_03.jpg", "0007_c6s3_085567_02.jpg",
        "0010_c2s1_000876_01.jpg", "0010_c4s1_001226_05.jpg", "0010_c5s1_001301_03.jpg",
        "0000_c1s1_000000_01.jpg",
        "-1_c2s1_000801_02.jpg",
    ],
    "query": [
        "0001_c1s1_001051_00.jpg",
        "0003_c2s1_000151_00.jpg", "0003_c3s1_000151_00.jpg",
        "0005_c4s1_000976_00.jpg",
    ],
    "bounding_box_test": [
        "0001_c2s1_000301_01.jpg", "0001_c3s1_000551_01.jpg",
        "0003_c1s1_000601_02.jpg",
        "0005_c5s1_001426_02.jpg", "0005_c6s1_002251_01.jpg",
        "0000_c1s1_000001_01.jpg", "0000_c2s1_000076_03.jpg", "0000_c6s1_001276_05.jpg",
        "-1_c1s1_000401_03.jpg", "-1_c4s1_009451_01.jpg",
    ],
}
MARKET_EXPECTED = {
    "train": {"ids": 4, "images": 9, "cameras": 6},
    "query": {"ids": 3, "images": 4, "cameras": 4},
    "gallery": {"ids": 4, "images": 8, "cameras": 5},  # distractor 0 counts as an identity, as in torchreid
}

# --- DukeMTMC-reID ------------------------------------------------------------------------------------------
# Duke's gallery distractors are ordinary identities that never appear in query.
DUKE_FILES = {
    "bounding_box_train": [
        "0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg",
        "0003_c1_f0044158.jpg", "0003_c8_f0045643.jpg", "0003_c8_f0045763.jpg",
        "0005_c3_f0050372.jpg",
    ],
    "query": ["0004_c1_f0046427.jpg", "0004_c7_f0167263.jpg", "0006_c2_f0048051.jpg"],
    "bounding_box_test": [
        "0004_c2_f0046787.jpg", "0004_c3_f0047347.jpg",
        "0006_c1_f0048291.jpg", "0006_c6_f0049931.jpg",
        "0008_c4_f0060127.jpg", "7140_c8_f0120111.jpg",
    ],
}
DUKE_EXPECTED = {
    "train": {"ids": 3, "images": 6, "cameras": 5},
    "query": {"ids": 2, "images": 3, "cameras": 3},
    "gallery": {"ids": 4, "images": 6, "cameras": 6},
}
# A Duke whose train split can lose identities to validation (data.val) and still fill the tiny configs'
# batches: DUKE_FILES plus 5 identities of 3 images on 2 cameras each (8 identities, 21 images).
DUKE_MORE_IDS_FILES = {
    **DUKE_FILES,
    "bounding_box_train": DUKE_FILES["bounding_box_train"] + [
        f"{pid:04d}_c{cam}_f{frame:07d}.jpg" for pid in (11, 13, 15, 17, 19)
        for cam, frame in ((1, 100 * pid), (1, 100 * pid + 40), (6, 100 * pid + 7))
    ],
}

# --- GTA_synthReid ------------------------------------------------------------------------------------------
GTA_FILES = {
    "bounding_box_train": [
        "42647445_sd000c08_0396.jpeg", "42647445_sd000c08_0400.jpeg", "42647445_sn001c19_0012.jpeg",
        "10000001_sd002c01_0001.jpeg", "10000001_sd002c02_0003.jpeg",
        "10000002_sn010c11_0100.jpeg",
    ],
    "query": ["20000001_sd003c05_0010.jpeg", "20000002_sn004c05_0020.jpeg"],
    "bounding_box_test": [
        "20000001_sd003c06_0011.jpeg", "20000001_sn005c07_0030.jpeg",
        "20000002_sd006c19_0040.jpeg", "20000003_sd007c01_0050.jpeg",
    ],
}
GTA_EXPECTED = {
    "train": {"ids": 3, "images": 6, "cameras": 5},
    "query": {"ids": 2, "images": 2, "cameras": 1},
    "gallery": {"ids": 3, "images": 4, "cameras": 4},
}
# A GTA_synthReid whose train split can lose identities to the baseline's validation: GTA_FILES plus 5
# identities of 3 images (day and night, 2 cameras) each (8 identities, 21 images).
GTA_MORE_IDS_FILES = {
    **GTA_FILES,
    "bounding_box_train": GTA_FILES["bounding_box_train"] + [
        f"{30000000 + pid}_s{time}{pid:03d}c{cam:02d}_{frame:04d}.jpeg" for pid in range(1, 6)
        for time, cam, frame in (("d", 3, 10 * pid), ("n", 3, 10 * pid + 1), ("d", 12, 10 * pid + 2))
    ],
}

# --- CUHK03-NP ----------------------------------------------------------------------------------------------
CUHK03_NP_FILES = {
    "bounding_box_train": [
        "0001_c1_1.png", "0001_c1_2.png", "0001_c2_1.png", "0002_c1_1.png", "0002_c2_3.png",
    ],
    "query": ["0101_c1_1.png", "0101_c2_1.png", "0102_c2_1.png"],
    "bounding_box_test": [
        "0101_c1_2.png", "0101_c2_2.png", "0102_c1_1.png", "0102_c1_2.png", "0103_c1_1.png",
    ],
}
CUHK03_NP_EXPECTED = {
    "train": {"ids": 2, "images": 5, "cameras": 2},
    "query": {"ids": 2, "images": 3, "cameras": 2},
    "gallery": {"ids": 3, "images": 5, "cameras": 2},
}

# --- CUHK03 original release --------------------------------------------------------------------------------
# Persons per camera pair and, for each person, the cells (0-9) that hold an image; 0-4 are the first camera's
# views, 5-9 the second's. The labeled boxes miss a few views the detector found and vice versa.
CUHK03_CELLS = {
    "detected": [
        [(0, 1, 5, 6), (0, 5), (1, 2, 7), (0, 1, 6, 7)],
        [(0, 2, 5), (0, 1, 2, 5, 6), (3, 4, 8)],
    ],
    "labeled": [
        [(0, 1, 5), (0, 5, 6), (1, 7), (0, 6, 9)],
        [(0, 5, 9), (0, 1, 5), (3, 4)],
    ],
}
CUHK03_TRAIN_PERSONS = 3  # the first persons (in pair order) are train; the others test
# query takes the first image of each view of a test person; gallery the rest
CUHK03_RELEASE_EXPECTED = {
    "detected": {
        "train": {"ids": 3, "images": 9, "cameras": 2},
        "query": {"ids": 4, "images": 8, "cameras": 2},
        "gallery": {"ids": 4, "images": 7, "cameras": 2},
    },
    "labeled": {
        "train": {"ids": 3, "images": 8, "cameras": 2},
        "query": {"ids": 4, "images": 7, "cameras": 2},
        "gallery": {"ids": 4, "images": 4, "cameras": 2},
    },
}

JUNK_FILES = ("Thumbs.db", "readme.txt")
SPLIT_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")


def write_image(path: str, size=IMAGE_SIZE) -> None:
  """A tiny RGB crop, its colours seeded by the file name; the format follows the suffix."""
  rng = np.random.default_rng(zlib.crc32(os.path.basename(path).encode()))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  fmt = "PNG" if path.endswith(".png") else "JPEG"
  Image.fromarray(pixels).save(path, format=fmt)


def write_broken_image(path: str) -> None:
  """A JPEG cut in half: it opens (and passes Image.verify) but does not decode."""
  write_image(path, size=(64, 32))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def flip_bytes(folder: str, count: int = 400) -> str:
  """Inverts `count` bytes in the middle of the largest file under `folder` (a damaged checkpoint item);
  -> that file."""
  files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  start = max(0, len(data) // 2 - count // 2)
  for i in range(start, min(len(data), start + count)):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))
  return path


def write_tree(dataset_dir: str, files: dict, extras: bool = True) -> None:
  """Split folders with the given image names, plus the clutter real releases carry."""
  for folder, names in files.items():
    for name in names:
      write_image(os.path.join(dataset_dir, folder, name))
    if extras:
      for junk in JUNK_FILES:
        with open(os.path.join(dataset_dir, folder, junk), "wb") as f:
          f.write(b"not an image")
  if extras:
    with open(os.path.join(dataset_dir, "readme.txt"), "w") as f:
      f.write("fake dataset for tests\n")


def make_market1501(manual_dir: str, folder: str = "Market-1501-v15.09.15") -> str:
  """Market-1501 under manual_dir/<folder> (also `market1501/Market-1501-v15.09.15` or `market1501`)."""
  dataset_dir = os.path.join(manual_dir, folder)
  write_tree(dataset_dir, MARKET_FILES)
  gallery = os.path.join(dataset_dir, "bounding_box_test")
  write_image(os.path.join(gallery, "0001_c1s1_000151_01.png"))  # another format: glob("*.jpg") skips it
  with open(os.path.join(gallery, "._0001_c1s1_000151_01.jpg"), "wb") as f:  # macOS metadata, hidden
    f.write(b"\x00\x05\x16\x07")
  return manual_dir


def make_dukemtmc_reid(manual_dir: str, folder: str = "DukeMTMC-reID", files: dict = DUKE_FILES) -> str:
  """DukeMTMC-reID under manual_dir/<folder>; `files` DUKE_MORE_IDS_FILES for validation runs."""
  write_tree(os.path.join(manual_dir, folder), files)
  return manual_dir


def make_gta_synthreid(manual_dir: str, files: dict = GTA_FILES) -> str:
  """GTA_synthReid under manual_dir; `files` GTA_MORE_IDS_FILES for validation runs."""
  write_tree(os.path.join(manual_dir, "GTA_synthReid"), files)
  return manual_dir


def make_cuhk03_np(manual_dir: str, image_types=("detected", "labeled")) -> str:
  for image_type in image_types:
    write_tree(os.path.join(manual_dir, "cuhk03-np", image_type), CUHK03_NP_FILES)
  return manual_dir


def _release_names(image_type):
  """(person index, name, view) of every image of the fake release, in pair/person/cell order."""
  entries, person = [], 0
  for pair, persons in enumerate(CUHK03_CELLS[image_type]):
    for index, cells in enumerate(persons):
      for cell in cells:
        view = 1 if cell < 5 else 2
        entries.append((person, f"{pair + 1}_{index + 1:03d}_{view}_{cell + 1:02d}.png", view))
      person += 1
  return entries


def _protocol(image_type):
  """The new-protocol fields of the fake: file list, labels and 1-based train/query/gallery indices."""
  entries = _release_names(image_type)
  train, query, gallery = [], [], []
  seen_views = set()
  for i, (person, _, view) in enumerate(entries, start=1):
    if person < CUHK03_TRAIN_PERSONS:
      train.append(i)
    elif (person, view) not in seen_views:
      seen_views.add((person, view))
      query.append(i)
    else:
      gallery.append(i)
  filelist = np.empty((len(entries), 1), dtype=object)
  for i, (_, name, _) in enumerate(entries):
    filelist[i, 0] = name
  labels = np.array([[person + 1] for person, _, _ in entries], dtype=np.int32)

  def column(indices):
    # Integers, as in the release: torchreid indexes arrays with them.
    return np.array(indices, dtype=np.int32).reshape(-1, 1)

  return {"filelist": filelist, "labels": labels, "train_idx": column(train), "query_idx": column(query),
          "gallery_idx": column(gallery)}


def make_cuhk03_release(manual_dir: str, folder: str = "cuhk03") -> str:
  """The original release: cuhk03_release/cuhk-03.mat (MATLAB v7.3) and the new-protocol split files.

  Cells hold MATLAB's column-major arrays: each image is stored as (3, W, H), each camera pair as
  (10, persons), empty cells as MATLAB's empty marker (a uint64 [0, 0]).
  """
  base = os.path.join(manual_dir, folder)
  os.makedirs(os.path.join(base, "cuhk03_release"), exist_ok=True)
  with h5py.File(os.path.join(base, "cuhk03_release", "cuhk-03.mat"), "w") as mat:
    refs = mat.create_group("#refs#")
    counter = iter(range(10**6))

    def store(array):
      dataset = refs.create_dataset(str(next(counter)), data=array)
      return dataset.ref

    def store_refs(ref_array):
      dataset = refs.create_dataset(str(next(counter)), data=ref_array, dtype=h5py.ref_dtype)
      return dataset.ref

    for image_type, pairs in CUHK03_CELLS.items():
      pair_refs = np.empty((1, len(pairs)), dtype=h5py.ref_dtype)
      for pair, persons in enumerate(pairs):
        cells = np.empty((10, len(persons)), dtype=h5py.ref_dtype)
        for index, present in enumerate(persons):
          for cell in range(10):
            if cell in present:
              rng = np.random.default_rng(zlib.crc32(f"{image_type}{pair}{index}{cell}".encode()))
              height, width = 12 + cell, 6 + index  # the release's crops vary in size
              image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
              cells[cell, index] = store(np.ascontiguousarray(image.T))
            else:
              cells[cell, index] = store(np.zeros(2, np.uint64))
        pair_refs[0, pair] = store_refs(cells)
      mat.create_dataset(image_type, data=pair_refs, dtype=h5py.ref_dtype)
    # The 20 classic test sets, as [pair, person] rows (torchreid reads them; the new protocol does not).
    testset = np.array([[1, 1], [2, 2]], dtype=np.float64).T
    testsets = np.array([[store(testset)]], dtype=h5py.ref_dtype)
    mat.create_dataset("testsets", data=testsets, dtype=h5py.ref_dtype)
  for image_type in CUHK03_CELLS:
    savemat(os.path.join(base, f"cuhk03_new_protocol_config_{image_type}.mat"), _protocol(image_type))
  return manual_dir


def make_more_ids(manual_dir: str) -> str:
  """GTA, Duke (DUKE_MORE_IDS_FILES, GTA_MORE_IDS_FILES) and Market under one manual_dir: the trees of runs
  with data.val, which hold identities out of the target's or the source's train split."""
  make_market1501(manual_dir)
  make_dukemtmc_reid(manual_dir, files=DUKE_MORE_IDS_FILES)
  make_gta_synthreid(manual_dir, files=GTA_MORE_IDS_FILES)
  return manual_dir


def make_all(manual_dir: str) -> str:
  """Every fake release under one manual_dir."""
  make_market1501(manual_dir)
  make_dukemtmc_reid(manual_dir)
  make_gta_synthreid(manual_dir)
  make_cuhk03_np(manual_dir)
  make_cuhk03_release(manual_dir)
  return manual_dir


# --- MSMT17 -------------------------------------------------------------------------------------------------
# List lines (relative path, pid) as in the release: per-identity folders, the camera as the third `_` field,
# pids 0-based and numbered separately in train and test. list_val repeats train identities, as the real one
# does; the train split is list_train alone (torchreid's without combineall), list_val the split "val".
MSMT17_LISTS = {
    "list_train.txt": [
        ("0000/0000_000_01_0303morning_0015_0.jpg", 0), ("0000/0000_001_01_0303morning_0016_1.jpg", 0),
        ("0000/0000_002_03_0303noon_0101_0.jpg", 0),
        ("0001/0001_000_15_0113afternoon_0200_0.jpg", 1), ("0001/0001_001_07_0113afternoon_0311_2.jpg", 1),
        ("0002/0002_000_11_0302morning_0042_0.jpg", 2),
    ],
    "list_val.txt": [
        ("0001/0001_002_02_0114noon_0077_0.jpg", 1), ("0002/0002_001_11_0302morning_0050_1.jpg", 2),
    ],
    "list_query.txt": [
        ("0000/0000_000_01_0113morning_0008_0.jpg", 0), ("0001/0001_000_04_0114noon_0017_2.jpg", 1),
        ("0001/0001_001_09_0114noon_0090_0.jpg", 1),
    ],
    "list_gallery.txt": [
        ("0000/0000_001_05_0113morning_0020_0.jpg", 0), ("0000/0000_002_06_0113noon_0033_1.jpg", 0),
        ("0001/0001_002_04_0114noon_0120_0.jpg", 1), ("0001/0001_003_12_0114afternoon_0200_0.jpg", 1),
        ("0002/0002_000_14_0302noon_0005_0.jpg", 2),
    ],
}
MSMT17_VAL_EXPECTED = {"ids": 2, "images": 2, "cameras": 2}  # list_val: identities 1 and 2, cameras 2, 11
MSMT17_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
MSMT17_UNLISTED = "0003/0003_000_08_0303noon_0010_0.jpg"  # an image in the train folder that no list names
MSMT17_EXPECTED = {
    "train": {"ids": 3, "images": 6, "cameras": 5},  # list_train: cameras 1, 3, 15, 7, 11
    "query": {"ids": 2, "images": 3, "cameras": 3},
    "gallery": {"ids": 3, "images": 5, "cameras": 5},
}


def make_msmt17(manual_dir: str, version: str = "MSMT17_V1", base: str = "msmt17") -> str:
  """MSMT17 V1 or V2 under manual_dir/<base>/<version> (base "" puts the release directly in manual_dir)."""
  release = os.path.join(manual_dir, base, version)
  train_dir, test_dir = (os.path.join(release, d) for d in MSMT17_VERSIONS[version])
  for list_name, lines in MSMT17_LISTS.items():
    images_dir = train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir
    for relative, _ in lines:
      write_image(os.path.join(images_dir, relative))
    os.makedirs(release, exist_ok=True)
    with open(os.path.join(release, list_name), "w") as f:
      f.writelines(f"{relative} {pid}\n" for relative, pid in lines)
  write_image(os.path.join(train_dir, MSMT17_UNLISTED))
  with open(os.path.join(train_dir, "Thumbs.db"), "wb") as f:
    f.write(b"not an image")
  return manual_dir
