"""PNG pictures: ranked retrieval results (torchreid's visrank) and image grids of training samples."""

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from synth_reid_jax.datasets.images import to_rgb

# visrank layout (pixels): the query, a wider gap, then the top-k gallery images with a frame each.
RANK_SPACING = 10  # between two gallery images
QUERY_SPACING = 90  # extra gap after the query
FRAME_WIDTH = 5
QUERY_FRAME = (0, 0, 0)
MATCH_FRAME = (0, 255, 0)  # green: same identity as the query
MISMATCH_FRAME = (255, 0, 0)  # red
BACKGROUND = (255, 255, 255)


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] (float) -> uint8 [0, 255]; uint8 input is returned as is."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_image(item) -> np.ndarray:
  """uint8 (H, W, 3) from an image array (uint8, or float in [-1, 1]), a file path or encoded bytes."""
  if isinstance(item, (str, os.PathLike)):
    with Image.open(item) as image:
      return np.asarray(to_rgb(image, f"image {item}"))
  if isinstance(item, (bytes, bytearray)):
    with Image.open(io.BytesIO(item)) as image:
      return np.asarray(to_rgb(image))
  image = to_uint8(item)
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] not in (1, 3):
    raise ValueError(f"Expected an (H, W, 3) image, got shape {image.shape}.")
  return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _framed(image, height, width, colour):
  """The image resized to fit inside a FRAME_WIDTH frame of `colour`, as a (height, width, 3) tile."""
  tile = Image.new("RGB", (width, height), colour)
  inner = (max(width - 2 * FRAME_WIDTH, 1), max(height - 2 * FRAME_WIDTH, 1))
  tile.paste(Image.fromarray(image).resize(inner, Image.BILINEAR), (FRAME_WIDTH, FRAME_WIDTH))
  return np.asarray(tile)


def _item_name(item, index):
  if isinstance(item, (str, os.PathLike)):
    return os.path.splitext(os.path.basename(os.fspath(item)))[0]
  return f"query_{index:05d}"


def ranked_gallery(distmat, q_pids, g_pids, q_camids, g_camids, query_index, topk):
  """Top-k gallery indices of one query in torchreid's order (argsort), skipping same pid *and* camid, with
  whether each is a correct match. The k nearest are found by argpartition, not a sort of the whole row."""
  from synth_reid_jax import evaluation
  row = np.asarray(distmat)[query_index][None, :]
  g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
  q_pid, q_camid = q_pids[query_index], q_camids[query_index]
  excluded = ((g_pids == q_pid) & (g_camids == q_camid))[None, :]
  indices, _ = evaluation._top_k_rows(row, topk, excluded)
  gallery = indices[0][indices[0] >= 0]
  return gallery, g_pids[gallery] == q_pid


def visrank(distmat, q_pids, g_pids, q_camids, g_camids, query_images: Sequence, gallery_images: Sequence,
            save_dir: str, *, topk: int = 10, height: int = 256, width: int = 128,
            query_indices: Sequence[int] | None = None, queries_per_file: int = 1,
            names: Sequence[str] | None = None, ranked: np.ndarray | None = None) -> list[str]:
  """Saves torchreid-style ranked results: per query a row "query | top-k gallery" with green / red frames.

  query_images / gallery_images: indexable; each entry an image array (uint8, or float in [-1, 1]), a file
  path or encoded bytes, loaded only when drawn. queries_per_file > 1 stacks that many query rows per PNG.
  Instead of a distance matrix (distmat=None), `ranked` may give every query's top-k gallery indices
  (evaluation.top_k with the ids: no matrix needed; -1 where fewer).
  Returns the paths written (one PNG per query, named after its file or index, or one per group of rows).
  """
  if distmat is None:
    if ranked is None:
      raise ValueError("visrank needs a distance matrix or the `ranked` top-k gallery indices.")
    ranked = np.asarray(ranked)
    shape = (len(q_pids), len(g_pids))
  else:
    distmat = np.asarray(distmat)
    shape = distmat.shape
  num_q, num_g = shape
  if len(query_images) != num_q or len(gallery_images) != num_g:
    raise ValueError(f"visrank: the ranking is {shape} but got {len(query_images)} query and "
                     f"{len(gallery_images)} gallery images.")
  if topk < 1 or queries_per_file < 1:
    raise ValueError(f"visrank needs topk >= 1 and queries_per_file >= 1, got {topk} and {queries_per_file}.")
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  indices = list(range(num_q)) if query_indices is None else [int(q) for q in query_indices]
  if any(not 0 <= q < num_q for q in indices):
    raise ValueError(f"visrank: query_indices must lie in [0, {num_q}), got {indices}.")
  os.makedirs(save_dir, exist_ok=True)
  row_width = (topk + 1) * width + topk * RANK_SPACING + QUERY_SPACING

  def draw_row(q):
    row = np.full((height, row_width, 3), BACKGROUND, np.uint8)
    row[:, :width] = _framed(load_image(query_images[q]), height, width, QUERY_FRAME)
    if distmat is None:
      gallery = ranked[q][:topk]
      gallery = gallery[gallery >= 0]
      correct = g_pids[gallery] == q_pids[q]
    else:
      gallery, correct = ranked_gallery(distmat, q_pids, g_pids, q_camids, g_camids, q, topk)
    for rank, (g, ok) in enumerate(zip(gallery, correct), start=1):
      left = rank * (width + RANK_SPACING) + QUERY_SPACING
      frame = MATCH_FRAME if ok else MISMATCH_FRAME
      row[:, left:left + width] = _framed(load_image(gallery_images[g]), height, width, frame)
    return row

  written = []
  for start in range(0, len(indices), queries_per_file):
    group = indices[start:start + queries_per_file]
    rows = [draw_row(q) for q in group]
    if queries_per_file == 1:
      q = group[0]
      name = names[q] if names is not None else _item_name(query_images[q], q)
    else:
      name = f"visrank_{start // queries_per_file:04d}"
      spacer = np.full((RANK_SPACING, row_width, 3), BACKGROUND, np.uint8)
      rows = [part for row in rows for part in (row, spacer)][:-1]
    path = os.path.join(save_dir, f"{name}.png")
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    written.append(path)
  return written


def save_image_grid(rows: Sequence, path: str, *, padding: int = 2) -> str:
  """Saves rows of image batches (each (N, H, W, 3) in [-1, 1] or uint8, one batch per row) as one PNG.

  Rows may hold different numbers of images (the rest stays black); e.g. rows = [source, translated, target].
  """
  batches = [to_uint8(batch) for batch in rows]
  if not batches:
    raise ValueError("save_image_grid needs at least one row of images.")
  shapes = {batch.shape[1:] for batch in batches}
  if len(shapes) != 1 or batches[0].ndim != 4:
    raise ValueError(f"save_image_grid needs (N, H, W, C) batches of one image size, got "
                     f"{[batch.shape for batch in batches]}.")
  height, width, channels = batches[0].shape[1:]
  columns = max(batch.shape[0] for batch in batches)
  grid = np.zeros((len(batches) * (height + padding) + padding, columns * (width + padding) + padding, 3),
                  np.uint8)
  for r, batch in enumerate(batches):
    if channels == 1:
      batch = np.repeat(batch, 3, axis=3)
    for c, image in enumerate(batch):
      top, left = padding + r * (height + padding), padding + c * (width + padding)
      grid[top:top + height, left:left + width] = image
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  Image.fromarray(grid).save(path, format="PNG")
  return path
