"""Per-image transforms: decoding, torchvision-equal resizes, the augmentations' properties, normalisation."""

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

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


def test_unknown_transform_and_bad_combinations_are_clear_errors():
  with pytest.raises(ValueError, match="random_patch"):
    transforms.TrainTransform(HEIGHT, WIDTH, transforms=("random_flip", "random_patch"))
  with pytest.raises(ValueError, match="keep one of them"):
    transforms.check_transforms(("random_crop", "random_crop_translate"))
  with pytest.raises(ValueError, match="pad without random_crop"):
    transforms.check_transforms(("pad", "random_flip"))
  assert transforms.check_transforms("random_erase") == ("random_erase",)
  with pytest.raises(ValueError, match="jitter_hue"):
    transforms.TrainTransform(HEIGHT, WIDTH, jitter=(0.2, 0.15, 0.0, 0.6))
  with pytest.raises(ValueError, match="erase_area"):
    transforms.TrainTransform(HEIGHT, WIDTH, erase_area=(0.4, 0.02))


def test_transforms_from_config_default_to_torchreid_parameters():
  config = default_config.get_config()
  train = transforms.train_transform(config)
  assert (train.height, train.width, train.crop_scale, train.crop_prob) == (256, 128, 1.125, 0.5)
  assert set(train.transforms) == {"random_flip", "random_crop_translate"}
  # torchreid's build_transforms: Pad(10), ColorJitter(0.2, 0.15, 0, 0), RandomErasing's defaults.
  assert train.pad_size == 10 and train.jitter == (0.2, 0.15, 0.0, 0.0)
  assert (train.erase_prob, train.erase_area, train.erase_aspect) == (0.5, (0.02, 0.4), 0.3)
  assert (transforms.eval_transform(config).height, transforms.eval_transform(config).width) == (256, 128)


# --- pad + random_crop ---------------------------------------------------------------------------------


def _position_image(height=HEIGHT, width=WIDTH):
  """Pixel (r, c) holds (r + 1, c + 1, 255): a crop tells where it was taken; padding is (0, 0, 0)."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([rows + 1, cols + 1, np.full_like(rows, 255)], axis=-1).astype(np.uint8)


def test_pad_is_a_black_border():
  array = _position_image()
  padded = np.asarray(transforms.pad(Image.fromarray(array), 3))
  assert padded.shape == (HEIGHT + 6, WIDTH + 6, 3)
  assert np.array_equal(padded[3:-3, 3:-3], array)
  assert padded[:3].max() == padded[-3:].max() == padded[:, :3].max() == padded[:, -3:].max() == 0


def test_pad_and_random_crop_keep_the_size_with_uniform_offsets():
  size = 3
  padded = np.asarray(transforms.pad(Image.fromarray(_position_image()), size))
  rng = np.random.default_rng(0)
  counts = np.zeros((2 * size + 1, 2 * size + 1), int)
  for _ in range(4900):
    crop = np.asarray(transforms.random_crop(Image.fromarray(padded), rng, HEIGHT, WIDTH))
    assert crop.shape == (HEIGHT, WIDTH, 3)
    y, x = np.argwhere(crop[..., 2] == 255)[0]  # an image pixel: its value says where it came from
    top, left = size + crop[y, x, 0] - 1 - y, size + crop[y, x, 1] - 1 - x
    assert np.array_equal(crop, padded[top:top + HEIGHT, left:left + WIDTH])
    counts[top, left] += 1
  # torchvision's RandomCrop: every offset 0..2 * pad in both directions, equally likely (100 each here).
  assert counts.min() > 60 and counts.max() < 145


def test_train_transform_pad_random_crop_and_pad_random_crop_translate():
  element = {"image": _position_image()}
  transform = transforms.TrainTransform(HEIGHT, WIDTH, ("pad", "random_crop"))
  offsets = set()
  for seed in range(300):
    out = transform.random_map(element, np.random.default_rng(seed))["image"]
    assert out.shape == (HEIGHT, WIDTH, 3)
    offsets.add(int((out[..., 2] == 0).sum()))  # how much black border the window caught
  assert 0 in offsets and len(offsets) > 10
  # With random_crop_translate (torchreid's Random2DTranslation after Pad), the padded image is resized back
  # when it is not cropped.
  translate = transforms.TrainTransform(HEIGHT, WIDTH, ("pad", "random_crop_translate"), pad_size=10,
                                        crop_prob=0.0)
  out = translate.random_map(element, np.random.default_rng(0))["image"]
  expected = np.asarray(transforms.pad(Image.fromarray(element["image"]), 10).resize((WIDTH, HEIGHT),
                                                                                       Image.BILINEAR))
  assert np.array_equal(out, expected)
  translate = transforms.TrainTransform(HEIGHT, WIDTH, ("pad", "random_crop_translate"), crop_prob=1.0)
  assert translate.random_map(element, np.random.default_rng(0))["image"].shape == (HEIGHT, WIDTH, 3)


# --- color_jitter --------------------------------------------------------------------------------------


def test_color_jitter_brightness_factors_span_torchreid_range():
  grey = Image.fromarray(np.full((4, 4, 3), 100, np.uint8))
  rng = np.random.default_rng(0)
  values = [np.asarray(transforms.color_jitter(grey, rng, 0.2, 0.0, 0.0, 0.0))[0, 0, 0] for _ in range(500)]
  # PIL's Brightness: 100 * factor, factor uniform in [0.8, 1.2].
  assert 80 <= min(values) <= 82 and 118 <= max(values) <= 120
  assert abs(np.mean(values) - 100) < 2


def test_color_jitter_contrast_is_pil_contrast_around_the_grey_mean():
  array = np.zeros((4, 4, 3), np.uint8)
  array[:, 2:] = 200
  image = Image.fromarray(array)
  rng = np.random.default_rng(1)
  for _ in range(50):
    state = rng.bit_generator.state
    out = np.asarray(transforms.color_jitter(image, rng, 0.0, 0.15, 0.0, 0.0))
    replay = np.random.default_rng()
    replay.bit_generator.state = state
    replay.permutation(4)
    factor = replay.uniform(0.85, 1.15)
    assert np.array_equal(out, np.asarray(ImageEnhance.Contrast(image).enhance(factor)))
  zero = transforms.color_jitter(image, rng, 0.0, 0.0, 0.0, 0.0)
  assert np.array_equal(np.asarray(zero), array)


def test_color_jitter_saturation_and_hue():
  image = Image.fromarray(_image(3))
  rng = np.random.default_rng(2)
  assert not np.array_equal(np.asarray(transforms.color_jitter(image, rng, 0.0, 0.0, 0.5, 0.0)),
                            np.asarray(image))
  shifted = np.asarray(transforms.color_jitter(image, rng, 0.0, 0.0, 0.0, 0.5))
  assert shifted.shape == (12, 6, 3) and not np.array_equal(shifted, np.asarray(image))
  assert transforms.jitter_range(0.2) == (0.8, 1.2) and transforms.jitter_range(1.5) == (0.0, 2.5)
  assert transforms.jitter_range(0.0) is None


# --- random_erase --------------------------------------------------------------------------------------


def test_random_erase_boxes_follow_torchreid_bounds():
  height, width = 256, 128
  rng = np.random.default_rng(0)
  boxes = np.stack([transforms.random_erase_box(height, width, rng, 0.5, (0.02, 0.4), 0.3)
                    for _ in range(4000)])
  erased = boxes[boxes[:, 2] > 0]
  assert 0.46 < len(erased) / len(boxes) < 0.54
  top, left, h, w = erased.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
  assert (h < height).all() and (w < width).all()
  fraction = h * w / (height * width)
  assert fraction.min() > 0.019 and fraction.max() < 0.41  # 0.02 .. 0.4 up to the rounding of h and w
  assert fraction.min() < 0.03 and fraction.max() > 0.3
  aspect = h / w
  assert aspect.min() > 0.28 and aspect.max() < 1 / 0.28
  # Positions are uniform: boxes touch every border sometimes.
  assert (top == 0).any() and (left == 0).any() and (top + h == height).any() and (left + w == width).any()
  never = transforms.random_erase_box(height, width, rng, 0.0, (0.02, 0.4), 0.3)
  assert never.tolist() == [0, 0, 0, 0]


def test_erase_paints_the_normalisation_mean_into_normalised_images():
  images = np.zeros((2, HEIGHT, WIDTH, 3), np.float32)
  boxes = np.asarray([[2, 1, 3, 4], [0, 0, 0, 0]], np.int32)
  mean = (0.485, 0.456, 0.406)
  transforms.erase(images, boxes, mean)
  assert np.array_equal(images[0, 2:5, 1:5], np.broadcast_to(np.asarray(mean, np.float32), (3, 4, 3)))
  assert (images[0].sum(-1) != 0).sum() == 12 and not images[1].any()


def test_train_transform_with_every_augmentation_is_deterministic_per_rng():
  transform = transforms.TrainTransform(
      HEIGHT, WIDTH, ("pad", "random_crop", "random_flip", "color_jitter", "random_erase"))
  element = {"image": _encode(_image()), "pid": 3}
  first, second = (transform.random_map(element, np.random.default_rng(5)) for _ in range(2))
  assert np.array_equal(first["image"], second["image"]) and first["image"].shape == (HEIGHT, WIDTH, 3)
  assert np.array_equal(first[transforms.ERASE_KEY], second[transforms.ERASE_KEY]) and first["pid"] == 3
  others = [transform.random_map(element, np.random.default_rng(s)) for s in range(20)]
  assert any(not np.array_equal(first["image"], o["image"]) for o in others)
  assert any(not np.array_equal(first[transforms.ERASE_KEY], o[transforms.ERASE_KEY]) for o in others)
  assert transforms.ERASE_KEY not in transforms.TrainTransform(HEIGHT, WIDTH).random_map(
      element, np.random.default_rng(0))
