"""Reading re-ID datasets as released: folder layouts, file-name patterns, junk and camera rules.

Each released dataset keeps its three splits in `bounding_box_train`, `query` and `bounding_box_test` and
encodes the identity and the camera in every file name. A `FolderLayout` says where a dataset lives under
manual_dir and how its names parse; `parse_splits` turns it into `Sample` lists exactly as torchreid's loaders
do (same files, same junk rule, 0-based cameras), keeping the original identity numbers (relabelling is the
input pipeline's job).
"""

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

from synth_reid_jax.errors import DatasetError, DatasetMissingError

SPLITS = ("train", "query", "gallery")
# Folder of each split in every released layout.
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JUNK_PID = -1  # Market-1501's false detections; torchreid drops them from every split.
DOCS_DIR = "datasets"  # one page per dataset in the repository: datasets/<page>.md


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of a split: where it is and what its name says."""

  path: str  # absolute path of the image file
  pid: int  # the original identity number (0 = distractor)
  camid: int  # 0-based camera index
  filename: str  # the file's name inside its split folder


@dataclasses.dataclass(frozen=True)
class FolderLayout:
  """Where a released dataset lives under manual_dir and how its file names parse."""

  name: str  # TFDS name
  roots: tuple[str, ...]  # candidate dataset folders relative to manual_dir; the first that exists is used
  suffix: str  # only files ending with this (case-sensitive, as a glob) are images; others are ignored
  pattern: str  # regex searched in the file name, with groups `pid` and `cam`
  cameras: tuple[int, int]  # allowed 1-based camera numbers (inclusive)
  pids: tuple[int, int] | None = None  # allowed identity numbers (inclusive) after junk removal, if bounded
  drop_junk: bool = True  # drop pid -1 (torchreid's Market rule; its Duke loader keeps every file)
  doc: str = ""  # page under datasets/ that says where the data comes from
  example: str = ""  # a valid file name, shown in error messages

  def expected_layout(self) -> str:
    root = self.roots[0]
    return "\n".join(f"  {root}/{SPLIT_FOLDERS[s]}/{self.example} ..." for s in SPLITS)

  def help(self) -> str:
    return f"See {DOCS_DIR}/{self.doc} for where to request the data and how to lay it out."


def _pattern(pid: str, cam: str, rest: str = "") -> str:
  return rf"(?P<pid>{pid})_{rest}c(?P<cam>{cam})"


# torchreid's Market/Duke rule: the identity is the (possibly negative) number before `_c`, the camera the
# single digit after it.
MARKET_PATTERN = _pattern(r"[-\d]+", r"\d")

MARKET1501 = FolderLayout(
    name="market1501",
    roots=("Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "market1501"),
    suffix=".jpg",
    pattern=MARKET_PATTERN,
    cameras=(1, 6),
    pids=(0, 1501),
    doc="market1501.md",
    example="0002_c1s1_000451_03.jpg",
)

DUKEMTMC_REID = FolderLayout(
    name="dukemtmc_reid",
    roots=("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID"),
    suffix=".jpg",
    pattern=MARKET_PATTERN,
    cameras=(1, 8),
    drop_junk=False,
    doc="dukemtmc_reid.md",
    example="0001_c2_f0046182.jpg",
)

# 42647445_sd000c08_0396.jpeg: identity, s + day/night (d|n) + sequence, camera (two digits, 01-19), frame.
GTA_SYNTHREID = FolderLayout(
    name="gta_synthreid",
    roots=("GTA_synthReid",),
    suffix=".jpeg",
    pattern=_pattern(r"\d+", r"\d{2}", rest=r"s[dn]\d+"),
    cameras=(1, 19),
    doc="gta_synthreid.md",
    example="42647445_sd000c08_0396.jpeg",
)


def cuhk03_np_layout(image_type: str) -> FolderLayout:
  """CUHK03-NP (the 767/700 protocol as image folders), parsed like Market; `image_type` detected|labeled."""
  return FolderLayout(
      name=f"cuhk03/{image_type}",
      roots=(f"cuhk03-np/{image_type}", f"cuhk03/cuhk03-np/{image_type}"),
      suffix=".png",
      pattern=MARKET_PATTERN,
      cameras=(1, 9),
      doc="cuhk03.md",
      example="0001_c1_1.png",
  )


def toy_layout(domain: str) -> FolderLayout:
  """The procedural reid_toy domain, written by `toy.write_domain` in the Market layout."""
  return FolderLayout(
      name=f"reid_toy/{domain}",
      roots=(domain,),
      suffix=".png",
      pattern=_pattern(r"\d+", r"\d+"),
      cameras=(1, 99),
      doc="reid_toy.md",
      example="0001_c1_0001.png",
  )


def find_root(layout: FolderLayout, manual_dir: str) -> str:
  """Returns the first of the layout's candidate folders under manual_dir, or says what is missing."""
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  for root in layout.roots:
    candidate = os.path.join(manual_dir, root)
    if os.path.isdir(candidate):
      return candidate
  tried = ", ".join(os.path.join(manual_dir, r) for r in layout.roots)
  raise DatasetMissingError(
      f"{layout.name}: no dataset folder under manual_dir {manual_dir} (looked for {tried}). Expected layout "
      f"under manual_dir:\n{layout.expected_layout()}\n{layout.help()}"
  )


def list_images(folder: str, suffix: str) -> list[str]:
  """Sorted names of the image files in a folder, as `glob(folder/*<suffix>)` would find them."""
  # Like glob, skip hidden files (e.g. macOS `._0001_c1.jpg`) and match the suffix case-sensitively, so
  # Thumbs.db, readme files and anything else lying around are ignored.
  return sorted(
      name
      for name in os.listdir(folder)
      if name.endswith(suffix) and not name.startswith(".") and os.path.isfile(os.path.join(folder, name))
  )


def parse_name(layout: FolderLayout, name: str, path: str) -> tuple[int, int] | None:
  """(pid, 0-based camid) from a file name, None for junk; raises naming the file when it does not parse."""
  match = re.search(layout.pattern, name)
  if match is None:
    raise DatasetError(
        f"{layout.name}: cannot parse identity and camera from file name {path} (expected names like "
        f"{layout.example}). Remove or rename the file. {layout.help()}"
    )
  pid, cam = int(match.group("pid")), int(match.group("cam"))
  if layout.drop_junk and pid == JUNK_PID:
    return None
  if layout.pids is not None and not layout.pids[0] <= pid <= layout.pids[1]:
    raise DatasetError(
        f"{layout.name}: identity {pid} of {path} is outside {layout.pids[0]}..{layout.pids[1]}. "
        f"Remove or rename the file."
    )
  if not layout.cameras[0] <= cam <= layout.cameras[1]:
    raise DatasetError(
        f"{layout.name}: camera {cam} of {path} is outside {layout.cameras[0]}..{layout.cameras[1]}. "
        f"Remove or rename the file."
    )
  return pid, cam - 1


def parse_folder(layout: FolderLayout, folder: str, split: str) -> list[Sample]:
  """Every kept image of one split folder, in file-name order."""
  samples = []
  for name in list_images(folder, layout.suffix):
    path = os.path.join(folder, name)
    parsed = parse_name(layout, name, path)
    if parsed is not None:
      samples.append(Sample(path=path, pid=parsed[0], camid=parsed[1], filename=name))
  if not samples:
    raise DatasetError(
        f"{layout.name}: split '{split}' is empty: no *{layout.suffix} images (other than junk) in {folder}. "
        f"{layout.help()}"
    )
  return samples


def parse_splits(layout: FolderLayout, manual_dir: str) -> dict[str, list[Sample]]:
  """The train, query and gallery samples of a dataset in its released folder layout."""
  root = find_root(layout, manual_dir)
  folders = {split: os.path.join(root, SPLIT_FOLDERS[split]) for split in SPLITS}
  for split, folder in folders.items():
    if not os.path.isdir(folder):
      raise DatasetMissingError(
          f"{layout.name}: missing folder {folder} (the '{split}' split). Expected layout under manual_dir:\n"
          f"{layout.expected_layout()}\n{layout.help()}"
      )
  return {split: parse_folder(layout, folder, split) for split, folder in folders.items()}


def split_summary(pids: Sequence[int], camids: Sequence[int]) -> dict[str, int]:
  """torchreid's numbers of one split: distinct identities (distractor 0 included), images, cameras."""
  return {"ids": len(set(pids)), "images": len(pids), "cameras": len(set(camids))}


def summary_table(name: str, summary: Mapping[str, Mapping[str, int]]) -> str:
  """The torchreid-style table of a dataset's splits."""
  rule = "  " + "-" * 40
  lines = [f"=> Loaded {name}", rule, "  subset   | # ids | # images | # cameras", rule]
  for split in SPLITS:
    s = summary[split]
    lines.append(f"  {split:<8} | {s['ids']:5d} | {s['images']:8d} | {s['cameras']:9d}")
  lines.append(rule)
  return "\n".join(lines)
