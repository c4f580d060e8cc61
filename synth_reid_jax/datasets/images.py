"""Image bytes in and out of the datasets: checked when building, decoded to uint8 RGB when reading."""

import io

import numpy as np
from PIL import Image

from synth_reid_jax.errors import DatasetError

# Formats whose RGB files are stored byte for byte; anything else (or any other mode) is re-encoded as PNG.
STORED_AS_IS = ("JPEG", "PNG")


def read_checked_image(path: str) -> bytes:
  """The encoded RGB image of a file, fully decoded once so a broken file fails the build, not training."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      # load() decodes every pixel: Image.verify() alone lets truncated JPEGs through.
      image.load()
      if image.format in STORED_AS_IS and image.mode == "RGB":
        return data
      rgb = image.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DatasetError(
        f"cannot read image {path}: {e}. Replace the file with a valid image or delete it.") from e
  # Grayscale, palette, RGBA or CMYK files become RGB PNGs, so every record decodes to H x W x 3.
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
      image = np.asarray(pil.convert("RGB"))
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
