"""Per-image preprocessing of torchreid's train and test transforms, as grain transforms.

Train, in the order of torchreid's `build_transforms`: resize to (height, width); `pad` (a black border of
`pad_size` pixels, torchvision's `Pad`); then either `random_crop` (a height x width window at a uniformly
random position, torchvision's `RandomCrop`) or `random_crop_translate` (with probability `crop_prob`, resize
to `crop_scale` times the output size and crop a random window); `random_flip`; `color_jitter` (torchvision's
`ColorJitter`); normalisation; `random_erase` (torchreid's `RandomErasing`, which acts on the normalised
tensor). Test: the resize alone. Resizes are PIL bilinear, like torchvision's `Resize` on PIL images. Images
stay uint8 until a whole batch is normalised at once in float32, `(x / 255 - mean) / std` as ToTensor +
Normalize compute it, so random_erase only draws its rectangle here (the `ERASE_KEY` of an element) and
`erase` paints it into the normalised batch.
"""

import io
import math
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image, ImageEnhance

from synth_reid_jax.datasets.images import to_rgb

# torchvision's RandomHorizontalFlip default, which the original uses.
FLIP_PROB = 0.5
# ToTensor maps uint8 to [0, 1] by this division.
PIXEL_MAX = 255.0
# Every train transform, in the order torchreid's build_transforms applies them.
TRAIN_TRANSFORMS = ("pad", "random_crop", "random_crop_translate", "random_flip", "color_jitter",
                    "random_erase")
# The thesis setting (synth-reid's configs).
DEFAULT_TRANSFORMS = ("random_flip", "random_crop_translate")
# torchreid's RandomErasing gives up after this many rectangles that do not fit.
ERASE_ATTEMPTS = 100
# The element key that carries random_erase's rectangle to the batch: (top, left, height, width), height 0
# when nothing is erased.
ERASE_KEY = "erase_box"


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
  return to_rgb(Image.open(io.BytesIO(value)))  # 16-bit, palette, alpha, CMYK: see datasets/images.py


def resize(image: Image.Image, height: int, width: int) -> Image.Image:
  """Bilinear resize to height x width (torchvision `Resize((h, w))` on a PIL image)."""
  if image.size == (width, height):
    return image
  return image.resize((width, height), Image.BILINEAR)


def crop_translate_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """The enlarged (height, width) that random_crop_translate crops from (Python's round, as the original)."""
  return int(round(height * scale)), int(round(width * scale))


def random_crop_translate(image: Image.Image, rng: np.random.Generator, scale: float, prob: float,
                          height: int | None = None, width: int | None = None) -> Image.Image:
  """With probability `prob`, resize to `scale` x (height, width) and crop a height x width window.

  torchreid's Random2DTranslation. The output size defaults to the input's; otherwise (after `pad`) an image
  that is not cropped is resized to it, as the original does.
  """
  if height is None or width is None:
    width, height = image.size
  if rng.uniform() > prob:
    return resize(image, height, width)
  big_height, big_width = crop_translate_size(height, width, scale)
  image = image.resize((big_width, big_height), Image.BILINEAR)
  x0 = int(round(rng.uniform(0, big_width - width)))
  y0 = int(round(rng.uniform(0, big_height - height)))
  return image.crop((x0, y0, x0 + width, y0 + height))


def pad(image: Image.Image, size: int) -> Image.Image:
  """A black border of `size` pixels on every side (torchvision `Pad(size)`: fill 0, constant mode)."""
  if size == 0:
    return image
  array = np.asarray(image)
  return Image.fromarray(np.pad(array, ((size, size), (size, size), (0, 0))))


def random_crop(image: Image.Image, rng: np.random.Generator, height: int, width: int) -> Image.Image:
  """A height x width window at a uniformly random integer offset (torchvision `RandomCrop((h, w))`)."""
  image_width, image_height = image.size
  if image_height < height or image_width < width:
    raise ValueError(f"random_crop: the image ({image_height}x{image_width}) is smaller than the crop "
                     f"({height}x{width}).")
  top = int(rng.integers(0, image_height - height + 1))
  left = int(rng.integers(0, image_width - width + 1))
  return image.crop((left, top, left + width, top + height))


def random_flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Mirror left-right with probability FLIP_PROB (in PIL: a reversed-stride numpy view is slow to batch)."""
  return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.uniform() < FLIP_PROB else image


def _adjust_hue(image: Image.Image, factor: float) -> Image.Image:
  """torchvision's PIL adjust_hue: shift the HSV hue channel by factor * 255 levels, wrapping around."""
  hue, saturation, value = image.convert("HSV").split()
  shifted = (np.asarray(hue, np.int64) + int(factor * 255)) % 256
  hue = Image.fromarray(shifted.astype(np.uint8), "L")
  return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def jitter_range(strength: float, center: float = 1.0, bound: float = 0.0) -> tuple[float, float] | None:
  """The factor interval of one ColorJitter parameter, None when it is off (torchvision's _check_input)."""
  if strength < 0:
    raise ValueError(f"color_jitter strengths (config.data.jitter_*) must be >= 0, got {strength}.")
  if strength == 0:
    return None
  return max(bound, center - strength), center + strength


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
  """torchvision's ColorJitter on a PIL image: the four adjustments in a random order, random factors.

  Brightness, contrast and saturation factors are uniform in [max(0, 1 - s), 1 + s], hue in [-h, h]; a
  strength of 0 leaves that adjustment out. Each adjustment is PIL's, as torchvision's PIL path.
  """
  ranges = (jitter_range(brightness), jitter_range(contrast), jitter_range(saturation),
            jitter_range(hue, center=0.0, bound=-0.5))
  order = rng.permutation(4)
  factors = [None if r is None else float(rng.uniform(*r)) for r in ranges]
  for index in order:
    factor = factors[index]
    if factor is None:
      continue
    if index == 0:
      image = ImageEnhance.Brightness(image).enhance(factor)
    elif index == 1:
      image = ImageEnhance.Contrast(image).enhance(factor)
    elif index == 2:
      image = ImageEnhance.Color(image).enhance(factor)
    else:
      image = _adjust_hue(image, factor)
  return image


def random_erase_box(height: int, width: int, rng: np.random.Generator, prob: float,
                     area: tuple[float, float], min_aspect: float) -> np.ndarray:
  """torchreid's RandomErasing rectangle: int32 (top, left, height, width), height 0 when nothing is erased.

  With probability `prob`, up to ERASE_ATTEMPTS tries of an area fraction uniform in `area` and an aspect
  (height / width) uniform in [min_aspect, 1 / min_aspect]; the first rectangle strictly smaller than the
  image is placed at a uniformly random integer position.
  """
  if rng.uniform() <= prob:
    for _ in range(ERASE_ATTEMPTS):
      target_area = rng.uniform(*area) * height * width
      aspect = rng.uniform(min_aspect, 1 / min_aspect)
      box_height = int(round(math.sqrt(target_area * aspect)))
      box_width = int(round(math.sqrt(target_area / aspect)))
      if box_width < width and box_height < height:
        top = int(rng.integers(0, height - box_height + 1))
        left = int(rng.integers(0, width - box_width + 1))
        return np.asarray([top, left, box_height, box_width], np.int32)
  return np.zeros(4, np.int32)


def erase(images: np.ndarray, boxes: np.ndarray, value: Sequence[float]) -> np.ndarray:
  """Paint each image's rectangle with `value` per channel, in place on normalised float (B, H, W, C) images.

  torchreid's RandomErasing fills the normalised tensor with the normalisation mean itself (so with mean =
  std = 0.5 the erased pixels read as 0.75 once un-normalised); this keeps that.
  """
  fill = np.asarray(value, np.float32)
  for image, (top, left, height, width) in zip(images, np.asarray(boxes)):
    if height > 0 and width > 0:
      image[top:top + height, left:left + width] = fill
  return images


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
  """Validate train transform names (config.data.transforms) and how they combine."""
  if isinstance(names, str):
    names = (names,)
  unknown = [n for n in names if n not in TRAIN_TRANSFORMS]
  if unknown:
    raise ValueError(f"Unknown train transform(s) {unknown} in config.data.transforms; "
                     f"choose from {TRAIN_TRANSFORMS}.")
  if "random_crop" in names and "random_crop_translate" in names:
    # torchreid's build_transforms would silently drop random_crop_translate here.
    raise ValueError("config.data.transforms has both random_crop and random_crop_translate; torchreid "
                     "applies only random_crop then: keep one of them.")
  if "pad" in names and not ("random_crop" in names or "random_crop_translate" in names):
    raise ValueError("config.data.transforms has pad without random_crop (or random_crop_translate), which "
                     "would leave images larger than height x width; add random_crop (torchreid's pad + "
                     "random_crop).")
  return tuple(names)


class TrainTransform(grain.transforms.RandomMap):
  """Decode + resize + augment a record's "image" to uint8 (height, width, 3); other keys pass through.

  With random_erase the element also gets ERASE_KEY, the rectangle the batch function paints after
  normalisation. Every draw comes from the rng grain gives each stream position.
  """

  def __init__(self, height: int, width: int, transforms: Sequence[str] = DEFAULT_TRANSFORMS, *,
               crop_scale: float = 1.125, crop_prob: float = 0.5, pad_size: int = 10,
               jitter: tuple[float, float, float, float] = (0.2, 0.15, 0.0, 0.0), erase_prob: float = 0.5,
               erase_area: tuple[float, float] = (0.02, 0.4), erase_aspect: float = 0.3):
    self.height, self.width = height, width
    self.transforms = check_transforms(transforms)
    self.crop_scale, self.crop_prob = crop_scale, crop_prob
    if pad_size < 0:
      raise ValueError(f"config.data.pad_size must be >= 0, got {pad_size}.")
    self.pad_size = pad_size
    self.jitter = tuple(jitter)
    for strength in self.jitter:
      jitter_range(strength)
    if self.jitter[3] > 0.5:
      raise ValueError(f"config.data.jitter_hue must be in [0, 0.5] (a hue shift of at most half the "
                       f"circle), got {self.jitter[3]}.")
    if not 0 < erase_area[0] <= erase_area[1] <= 1 or not 0 < erase_aspect <= 1:
      raise ValueError("random_erase needs 0 < erase_area[0] <= erase_area[1] <= 1 and 0 < erase_aspect <= 1 "
                       f"(config.data), got erase_area={tuple(erase_area)}, erase_aspect={erase_aspect}.")
    self.erase_prob, self.erase_area, self.erase_aspect = erase_prob, tuple(erase_area), erase_aspect

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = resize(to_pil(element["image"]), self.height, self.width)
    if "pad" in self.transforms:
      image = pad(image, self.pad_size)
    if "random_crop" in self.transforms:
      image = random_crop(image, rng, self.height, self.width)
    elif "random_crop_translate" in self.transforms:
      image = random_crop_translate(image, rng, self.crop_scale, self.crop_prob, self.height, self.width)
    if "random_flip" in self.transforms:
      image = random_flip(image, rng)
    if "color_jitter" in self.transforms:
      image = color_jitter(image, rng, *self.jitter)
    out = {**element, "image": np.asarray(image)}
    if "random_erase" in self.transforms:
      out[ERASE_KEY] = random_erase_box(self.height, self.width, rng, self.erase_prob, self.erase_area,
                                        self.erase_aspect)
    return out


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
  return TrainTransform(
      data.height, data.width, data.transforms, crop_scale=data.crop_scale, crop_prob=data.crop_prob,
      pad_size=data.pad_size,
      jitter=(data.jitter_brightness, data.jitter_contrast, data.jitter_saturation, data.jitter_hue),
      erase_prob=data.erase_prob, erase_area=tuple(data.erase_area), erase_aspect=data.erase_aspect)


def eval_transform(config) -> EvalTransform:
  """The test transform that `config.data` describes."""
  return EvalTransform(config.data.height, config.data.width)
