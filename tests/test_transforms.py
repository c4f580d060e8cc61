"""Per-image transforms: decoding, torchvision-equal resizes, the augmentations' properties, normalisation."""

import io

import numpy as np
import pytest
from PIL import Image

from configs import default as default_config
from synth_reid_jax import transforms

HEIGHT, WIDTH = 16, 8


def _image(seed=0, height=12, width=6):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(array, fmt="PNG"):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def test_to_pil_decodes_bytes_and_arrays_to_rgb():
  array = _image()
  assert np.array_equal(np.asarray(transforms.to_pil(_encode(array))), array)
  assert np.array_equal(np.asarray(transforms.to_pil(array)), array)
  assert np.array_equal(np.asarray(transforms.to_pil(np.array(_encode(array), dtype=object))), array)
  gray = _encode(array[..., 0])
  assert np.asarray(transforms.to_pil(gray)).shape == (12, 6, 3)
  with pytest.raises(TypeError, match="float"):
    transforms.to_pil(1.5)
  with pytest.raises(ValueError, match="shape"):
    transforms.to_pil(array[..., :2])


def test_resize_is_pil_bilinear_and_skips_same_size():
  image = Image.fromarray(_image())
  resized = transforms.resize(image, HEIGHT, WIDTH)
  assert resized.size == (WIDTH, HEIGHT)
  assert np.array_equal(np.asarray(resized), np.asarray(image.resize((WIDTH, HEIGHT), Image.BILINEAR)))
  # PIL's resize to the same size is a copy, so skipping it changes nothing.
  assert np.array_equal(np.asarray(transforms.resize(resized, HEIGHT, WIDTH)), np.asarray(resized))


def test_crop_translate_size_uses_python_round():
  assert transforms.crop_translate_size(256, 128, 1.125) == (288, 144)
  assert transforms.crop_translate_size(16, 8, 1.125) == (18, 9)
  assert transforms.crop_translate_size(4, 4, 1.125) == (4, 4)  # round(4.5) == 4, as the original


def test_random_crop_translate_probability_zero_and_one():
  image = Image.fromarray(_image(height=HEIGHT, width=WIDTH))
  rng = np.random.default_rng(0)
  assert transforms.random_crop_translate(image, rng, 1.125, prob=0.0) is image
  big = np.asarray(image.resize((9, 18), Image.BILINEAR))
  offsets = set()
  for _ in range(200):
    crop = np.asarray(transforms.random_crop_translate(image, rng, 1.125, prob=1.0))
    assert crop.shape == (HEIGHT, WIDTH, 3)
    # The crop is a window of the once-more resized image.
    matches = [(y, x) for y in range(3) for x in range(2)
               if np.array_equal(big[y:y + HEIGHT, x:x + WIDTH], crop)]
    assert matches
    offsets.update(matches)
  assert {(0, 0), (2, 1)} <= offsets  # both extreme offsets occur


def test_random_crop_translate_frequency_follows_prob():
  image = Image.fromarray(_image(height=HEIGHT, width=WIDTH))
  rng = np.random.default_rng(1)
  cropped = sum(transforms.random_crop_translate(image, rng, 1.125, 0.5) is not image for _ in range(2000))
  assert 900 < cropped < 1100


def test_random_flip_is_an_exact_mirror_half_the_time():
  array = _image()
  image = Image.fromarray(array)
  rng = np.random.default_rng(0)
  flips = 0
  for _ in range(1000):
    out = np.asarray(transforms.random_flip(image, rng))
    flipped = np.array_equal(out, array[:, ::-1])
    assert flipped or np.array_equal(out, array)
    flips += flipped
  assert 430 < flips < 570


def test_normalize_matches_totensor_normalize_in_float32():
  images = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  out = transforms.normalize(images, mean, std)
  expected = (images.astype(np.float32) / np.float32(255) - np.asarray(mean, np.float32)) / np.asarray(
      std, np.float32)
  assert out.dtype == np.float32 and np.array_equal(out, expected)
  half = transforms.normalize(images, (0.5,) * 3, (0.5,) * 3)
  assert half.min() == -1.0 and half.max() == 1.0
  with pytest.raises(TypeError, match="uint8"):
    transforms.normalize(images.astype(np.float32), mean, std)


def test_train_transform_is_deterministic_given_rng_and_keeps_keys():
  transform = transforms.TrainTransform(HEIGHT, WIDTH)
  element = {"image": _encode(_image()), "pid": 3}
  outs = [transform.random_map(element, np.random.default_rng(7))["image"] for _ in range(2)]
  assert outs[0].shape == (HEIGHT, WIDTH, 3) and outs[0].dtype == np.uint8
  assert np.array_equal(outs[0], outs[1])
  different = [transform.random_map(element, np.random.default_rng(s))["image"] for s in range(20)]
  assert any(not np.array_equal(different[0], d) for d in different)
  assert transform.random_map(element, np.random.default_rng(0))["pid"] == 3


def test_train_transform_without_augmentation_equals_eval_transform():
  element = {"image": _encode(_image())}
  train = transforms.TrainTransform(HEIGHT, WIDTH, transforms=())
  plain = train.random_map(element, np.random.default_rng(0))
  assert np.array_equal(plain["image"], transforms.EvalTransform(HEIGHT, WIDTH).map(element)["image"])


def test_unknown_transform_is_a_clear_error():
  with pytest.raises(ValueError, match="random_erase"):
    transforms.TrainTransform(HEIGHT, WIDTH, transforms=("random_flip", "random_erase"))


def test_transforms_from_config():
  config = default_config.get_config()
  train = transforms.train_transform(config)
  assert (train.height, train.width, train.crop_scale, train.crop_prob) == (256, 128, 1.125, 0.5)
  assert set(train.transforms) == {"random_flip", "random_crop_translate"}
  assert (transforms.eval_transform(config).height, transforms.eval_transform(config).width) == (256, 128)
