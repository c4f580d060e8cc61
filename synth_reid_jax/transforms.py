"""Per-image preprocessing of torchreid's train and test transforms, as grain transforms.

Train: resize to (height, width), then `random_crop_translate` (with probability `crop_prob`, resize again to
`crop_scale` times that size and crop a random height x width window), then `random_flip`; test: the resize
alone. Resizes are PIL bilinear, like torchvision's `Resize` on PIL images. Images stay uint8 until a whole
batch is normalised at once in float32, `(x / 255 - mean) / std` as ToTensor + Normalize compute it.
"""

import io
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

# torchvision's RandomHorizontalFlip default, which the original uses.
FLIP_PROB = 0.5
# ToTensor maps uint8 to [0, 1] by this division.
PIXEL_MAX = 255.0
TRAIN_TRANSFORMS = ("random_flip", "random_crop_translate")


def to_pil(value) -> Image.Image:
  """A record's image (encoded bytes, or a uint8 HxWx3 array) as an RGB PIL image."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8:
    if value.ndim != 3 or value.shape[-1] != 3:
      raise ValueError(f"Expected a uint8 image of shape (H, W, 3), got shape {value.shape}.")
    return Image.fromarray(value)
  if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.size == 1:
    value = value.item()
  if not isinstance(value, (bytes, bytearray, memoryview)):
    raise TypeError(f"Cannot decode an image from a {type(value).__name__}; expected encoded bytes or a "
                    "uint8 (H, W, 3) array.")
  image = Image.open(io.BytesIO(value))
  return image if image.mode == "RGB" else image.convert("RGB")


def resize(image: Image.Image, height: int, width: int) -> Image.Image:
  """Bilinear resize to height x width (torchvision `Resize((h, w))` on a PIL image)."""
  if image.size == (width, height):
    return image
  return image.resize((width, height), Image.BILINEAR)


def crop_translate_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """The enlarged (height, width) that random_crop_translate crops from (Python's round, as the original)."""
  return int(round(height * scale)), int(round(width * scale))


def random_crop_translate(image: Image.Image, rng: np.random.Generator, scale: float,
                          prob: float) -> Image.Image:
  """With probability `prob`, enlarge by `scale` and crop a window of the input size (Random2DTranslation).

  The input is already height x width; the original resizes it a second time rather than the source image.
  """
  if rng.uniform() > prob:
    return image
  width, height = image.size
  big_height, big_width = crop_translate_size(height, width, scale)
  image = image.resize((big_width, big_height), Image.BILINEAR)
  x0 = int(round(rng.uniform(0, big_width - width)))
  y0 = int(round(rng.uniform(0, big_height - height)))
  return image.crop((x0, y0, x0 + width, y0 + height))


def random_flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Mirror left-right with probability FLIP_PROB (in PIL: a reversed-stride numpy view is slow to batch)."""
  return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.uniform() < FLIP_PROB else image


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """float32 (C, 256): each channel's normalised value of every uint8 level, as ToTensor + Normalize."""
  levels = np.arange(256, dtype=np.float32)[None, :]
  table = (levels / np.float32(PIXEL_MAX) - np.asarray(mean, np.float32)[:, None]) / np.asarray(
      std, np.float32)[:, None]
  return table.astype(np.float32)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
              table: np.ndarray | None = None) -> np.ndarray:
  """uint8 (..., C) -> float32 `(x / 255 - mean) / std`, bit-identical to ToTensor + Normalize in float32.

  A table lookup of the 256 levels is one pass over the pixels instead of four float passes.
  """
  if images.dtype != np.uint8:
    raise TypeError(f"normalize expects uint8 images, got {images.dtype}.")
  table = normalize_table(mean, std) if table is None else table
  if images.shape[-1] != len(table):
    raise ValueError(f"Images have {images.shape[-1]} channels but mean/std have {len(table)}.")
  if (table == table[0]).all():
    return np.take(table[0], images, mode="clip")
  out = np.empty(images.shape, np.float32)
  for c in range(len(table)):
    np.take(table[c], images[..., c], out=out[..., c], mode="clip")
  return out


def to_uint8(images, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalised float images -> uint8 (the inverse of `normalize`, rounded)."""
  pixels = (np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean)) * PIXEL_MAX
  return np.clip(np.round(pixels), 0, PIXEL_MAX).astype(np.uint8)


def check_transforms(names: Sequence[str]) -> tuple[str, ...]:
  """Validate train transform names (config.data.transforms)."""
  if isinstance(names, str):
    names = (names,)
  unknown = [n for n in names if n not in TRAIN_TRANSFORMS]
  if unknown:
    raise ValueError(f"Unknown train transform(s) {unknown} in config.data.transforms; "
                     f"choose from {TRAIN_TRANSFORMS}.")
  return tuple(names)


class TrainTransform(grain.transforms.RandomMap):
  """Decode + resize + augment a record's "image" to uint8 (height, width, 3); other keys pass through."""

  def __init__(self, height: int, width: int, transforms: Sequence[str] = TRAIN_TRANSFORMS,
               crop_scale: float = 1.125, crop_prob: float = 0.5):
    self.height, self.width = height, width
    self.transforms = check_transforms(transforms)
    self.crop_scale, self.crop_prob = crop_scale, crop_prob

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = resize(to_pil(element["image"]), self.height, self.width)
    if "random_crop_translate" in self.transforms:
      image = random_crop_translate(image, rng, self.crop_scale, self.crop_prob)
    if "random_flip" in self.transforms:
      image = random_flip(image, rng)
    return {**element, "image": np.asarray(image)}


class EvalTransform(grain.transforms.Map):
  """Decode + resize the "image" of a record to uint8 (height, width, 3); other keys pass through."""

  def __init__(self, height: int, width: int):
    self.height, self.width = height, width

  def map(self, element: dict) -> dict:
    image = resize(to_pil(element["image"]), self.height, self.width)
    return {**element, "image": np.asarray(image)}


def train_transform(config) -> TrainTransform:
  """The train transform that `config.data` describes."""
  data = config.data
  return TrainTransform(data.height, data.width, data.transforms, data.crop_scale, data.crop_prob)


def eval_transform(config) -> EvalTransform:
  """The test transform that `config.data` describes."""
  return EvalTransform(config.data.height, config.data.width)
