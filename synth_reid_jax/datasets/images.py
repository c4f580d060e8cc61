"""Image bytes in and out of the datasets: checked when building, decoded to uint8 RGB when reading.

`to_rgb` is the one conversion of a decoded image to 8-bit RGB, used wherever files are read (the dataset
builders, translate / extract, the FID tool): alpha is dropped (the stored colours are kept, as torchreid's
`convert("RGB")` does), palette images take their palette's colours (a transparent index included), 16- and
32-bit grayscale is scaled from its samples' full range (0..65535, 0..2**31-1) to 0..255, never clipped; CMYK
and YCbCr go through PIL's conversions. Images whose samples have no fixed range (32-bit float, negative
integers) are refused by name.
"""

import io

import numpy as np
from PIL import Image

from synth_reid_jax.errors import DatasetError

# Formats whose RGB files are stored byte for byte; anything else (or any other mode) is re-encoded as PNG.
STORED_AS_IS = ("JPEG", "PNG")
# Unsigned 16-bit grayscale modes: scaled from 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Mode "I" holds 32-bit signed integers: 16-bit data (scaled from 0..65535) or 32-bit data (from 0..2**31-1).
INT32_MODE = "I"
TIFF_BITS_PER_SAMPLE = 258
SAMPLE_MAX = {16: 2 ** 16 - 1, 32: 2 ** 31 - 1}


def _bits_per_sample(image: Image.Image, samples: np.ndarray) -> int:
  """16 or 32: what a mode-"I" image holds (a TIFF says; otherwise any value above 65535 means 32 bits)."""
  tags = getattr(image, "tag_v2", None)
  declared = tags.get(TIFF_BITS_PER_SAMPLE) if tags is not None else None
  if isinstance(declared, tuple):
    declared = declared[0] if declared else None
  if declared in SAMPLE_MAX:
    return declared
  return 16 if samples.size == 0 or samples.max() <= SAMPLE_MAX[16] else 32


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
  """The image as 8-bit RGB (see the module docstring); raises DatasetError naming `name` and the mode for
  an image that has no faithful 8-bit reading."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in SIXTEEN_BIT_MODES or mode == INT32_MODE:
    samples = np.asarray(image)
    if samples.size and samples.min() < 0:
      raise DatasetError(f"{name}: mode {mode} holds negative samples (signed integers), which have no 8-bit "
                         "reading; save it as 8- or 16-bit unsigned grayscale, or RGB.")
    bits = 16 if mode in SIXTEEN_BIT_MODES else _bits_per_sample(image, samples)
    scaled = np.round(samples.astype(np.float64) * (255.0 / SAMPLE_MAX[bits])).astype(np.uint8)
    return Image.fromarray(np.repeat(scaled[..., None], 3, axis=-1), "RGB")
  if mode == "F":
    raise DatasetError(f"{name}: mode F (32-bit floating-point samples) has no fixed range to read as 8 "
                       "bits; save it as 8- or 16-bit grayscale, or RGB.")
  if mode == "PA":  # PIL converts PA only to RGBA: its colours, alpha dropped as everywhere
    return image.convert("RGBA").convert("RGB")
  try:
    return image.convert("RGB")
  except ValueError as e:
    raise DatasetError(f"{name}: PIL cannot convert mode {mode} to RGB ({e}); save it as RGB.") from e


def read_checked_image(path: str) -> bytes:
  """The encoded RGB image of a file, fully decoded once so a broken file fails the build, not training."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      # load() decodes every pixel: Image.verify() alone lets truncated JPEGs through.
      image.load()
      if image.format in STORED_AS_IS and image.mode == "RGB":
        return data
      rgb = to_rgb(image, f"image {path}")
  except DatasetError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DatasetError(
        f"cannot read image {path}: {e}. Replace the file with a valid image or delete it.") from e
  # Grayscale, 16-bit, palette, RGBA or CMYK files become RGB PNGs, so every record decodes to H x W x 3.
  buffer = io.BytesIO()
  rgb.save(buffer, format="PNG")
  return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 (H, W, 3) array."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def decode_image(value) -> np.ndarray:
  """uint8 (H, W, 3) from a record's "image": encoded bytes (SkipDecoding) or the array TFDS decoded."""
  if isinstance(value, np.ndarray) and value.dtype != object:
    image = value
  elif isinstance(value, (bytes, bytearray, memoryview, np.bytes_)) or (
      isinstance(value, np.ndarray) and value.dtype == object and value.shape == ()
  ):
    data = value.item() if isinstance(value, np.ndarray) else value
    with Image.open(io.BytesIO(bytes(data))) as pil:
      image = np.asarray(to_rgb(pil, "a record's image"))
  else:
    raise TypeError(f"decode_image expects encoded image bytes or a uint8 array, got {type(value).__name__}.")
  if image.dtype != np.uint8:
    raise TypeError(f"decode_image expects uint8 pixels, got {image.dtype}.")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise DatasetError(f"decode_image expects an (H, W, C) image with C in 1, 3, 4, got shape {image.shape}.")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])
