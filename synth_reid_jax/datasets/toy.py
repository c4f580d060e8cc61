"""reid_toy: a procedural synthetic/real domain pair for CPU demos and tests, drawn with vectorised numpy.

Identities differ in clothing colours, clothing patterns, bags and build; cameras differ in viewpoint,
background, distance and light. Both domains draw people and cameras from the same distributions. "synthetic"
renders them clean and flat-shaded, like a game; "real" renders them the way footage differs from a game: body
shading and vignetting, cloth grain, cluttered backgrounds, a colour cast with washed-out colours, lens blur
and sensor noise. These are style changes only (the same person in the same pose keeps shape and layout), so
an image translation can bridge the gap, while a re-ID model trained on "synthetic" alone meets unseen
statistics on "real". `ToyConfig.gap` scales every one of these differences at once.

Each domain is written as a Market-style release (`bounding_box_train`, `query`, `bounding_box_test`, names
`<pid:04d>_c<camera>_<index:04d>.png`) and then built by the same TFDS machinery as the real datasets.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from scipy import ndimage

from synth_reid_jax.datasets import parsing

DOMAINS = ("synthetic", "real")
CHUNK = 256  # images rendered at once; pixel noise is drawn per chunk so results do not depend on memory
CONFIG_FILE = "toy_config.json"
# Bump whenever the same ToyConfig would draw different images: it is part of the settings stored with (and
# the cache key of) a prepared reid_toy, so an older one is rebuilt instead of silently reused.
RENDER_VERSION = 1
LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# Body proportions, as fractions of the person's height (a person of 1.0 spans head to toe).
HEAD_RADIUS = 0.075
SHOULDER_HALF_WIDTH = 0.13
WAIST = 0.5
LEG_HALF_WIDTH = 0.042
LEG_OFFSET = 0.048
ARM_WIDTH = 0.05
SHOE_HEIGHT = 0.045
SKIRT_LENGTH = 0.26
SHORTS_LENGTH = 0.2
SIDE_VIEW_WIDTH = 0.7  # torso and hips seen from the side are this much narrower
# Real-domain texture scales: cloth grain (pixels), background clutter (fraction of the height) and how much
# of the clutter is colour rather than brightness.
GRAIN_SIGMA = 0.6
CLUTTER_SCALE = 1 / 16
CLUTTER_CHROMA = 0.4

FRONT, BACK, SIDE = 0, 1, 2  # viewpoints
SOLID, H_STRIPES, V_STRIPES, CHECKER, TWO_TONE, LOGO = range(6)  # top patterns
TROUSERS, SHORTS, SKIRT = range(3)  # bottoms
NO_BAG, BACKPACK, SHOULDER_BAG = range(3)

SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.53], [0.72, 0.52, 0.38], [0.45, 0.31, 0.22]],
                      np.float32)
HAIR_COLOURS = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.09], [0.62, 0.45, 0.22], [0.55, 0.55, 0.55]],
                        np.float32)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """Every number that shapes the reid_toy pair; the defaults build both domains in a few seconds."""

  seed: int = 0
  height: int = 64
  width: int = 32
  num_train_ids: int = 100  # per domain; train and test identities are disjoint
  num_test_ids: int = 50  # per domain, split into query and gallery
  images_per_id: int = 8  # each identity cycles through the cameras in a random order
  num_cameras: int = 4
  queries_per_id: int = 2  # the first images of a test identity (distinct cameras) go to query
  # Camera differences, in both domains.
  camera_light: float = 0.25  # spread of the cameras' brightness (gain 1 +- this)
  camera_tint: float = 0.08  # spread of the cameras' white balance, per channel
  view_consistency: float = 0.75  # probability that an image shows its camera's usual viewpoint
  # True: both domains film the same places, so they differ only in how they are rendered (and in who walks
  # by); False: each domain draws its own cameras, which adds a scene gap no image translation can close.
  shared_cameras: bool = True
  # The synthetic -> real gap; each effect below is multiplied by `gap` (0 makes the domains look alike).
  gap: float = 1.0
  colour_cast: tuple[float, float, float] = (1.12, 1.0, 0.78)  # per-channel gain of the real domain
  desaturation: float = 0.35  # mix of every colour towards its grey level
  gamma: float = 1.3  # > 1 darkens the mid-tones
  shading: float = 0.45  # cylindrical shading of bodies and vignetting
  texture: float = 0.1  # amplitude of cloth grain on people
  clutter: float = 0.08  # amplitude of low-frequency blobs on backgrounds
  blur_sigma: float = 0.9  # pixels
  noise_std: float = 0.04  # sensor noise, fraction of full scale

  def __post_init__(self):
    if self.height < 16 or self.width < 8:
      raise ValueError(f"ToyConfig: image size {self.height}x{self.width} is too small; use at least 16x8.")
    if self.queries_per_id >= self.images_per_id:
      raise ValueError(
          f"ToyConfig: queries_per_id={self.queries_per_id} leaves no gallery image of an identity; "
          f"use fewer than images_per_id={self.images_per_id}."
      )
    if self.queries_per_id >= self.num_cameras:
      # With fewer query images than cameras, the first gallery image is in a camera no query uses, so
      # every query has a true match in another camera (the Market protocol drops same-camera matches).
      raise ValueError(
          f"ToyConfig: queries_per_id={self.queries_per_id} must be below num_cameras={self.num_cameras}.")
    if min(self.queries_per_id, self.num_train_ids, self.num_test_ids) < 1 or self.num_cameras < 2:
      raise ValueError(
          "ToyConfig: need >= 1 train and test identity, >= 1 query per identity and >= 2 cameras.")

  def to_json(self) -> dict:
    """The settings as plain JSON values (tuples become lists) and the RENDER_VERSION, as stored with a
    prepared dataset."""
    return json.loads(json.dumps({**dataclasses.asdict(self), "render_version": RENDER_VERSION}))


def _hsv_to_rgb(h, s, v):
  """Vectorised HSV -> RGB in [0, 1]; inputs broadcast, output has a trailing axis of 3."""
  k = (np.array([5.0, 3.0, 1.0], np.float32) + h[..., None] * 6.0) % 6.0
  return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _random_colours(rng, n, saturation=(0.35, 1.0), value=(0.25, 1.0)):
  return _hsv_to_rgb(rng.random(n, np.float32), rng.uniform(*saturation, n).astype(np.float32),
                     rng.uniform(*value, n).astype(np.float32))


def _draw_identities(rng, n):
  """Per-identity appearance: clothes, pattern, bag, build."""
  return {
      "top": _random_colours(rng, n),
      "pattern": rng.integers(0, 6, n),
      "pattern_colour": _random_colours(rng, n),
      "period": rng.uniform(2.5, 5.0, n).astype(np.float32),  # stripe width, fraction of height / 100
      "bottom": _random_colours(rng, n, value=(0.15, 0.9)),
      "bottom_kind": rng.choice(3, n, p=[0.6, 0.2, 0.2]),
      "long_sleeves": rng.random(n) < 0.5,
      "skin": SKIN_TONES[rng.integers(0, len(SKIN_TONES), n)],
      "hair": HAIR_COLOURS[rng.integers(0, len(HAIR_COLOURS), n)],
      "shoes": _random_colours(rng, n, saturation=(0.0, 0.5), value=(0.05, 0.6)),
      "bag": rng.choice(3, n, p=[0.5, 0.25, 0.25]),
      "bag_colour": _random_colours(rng, n),
      "stature": rng.uniform(0.78, 0.95, n).astype(np.float32),
      "build": rng.uniform(0.8, 1.25, n).astype(np.float32),
  }


def _draw_cameras(rng, config):
  """Per-camera viewpoint, background, distance and light."""
  n = config.num_cameras
  return {
      "view": np.arange(n) % 3,  # cameras look at people from the front, the back or the side
      "wall": _random_colours(rng, n, saturation=(0.0, 0.5), value=(0.35, 0.95)),
      "floor": _random_colours(rng, n, saturation=(0.0, 0.4), value=(0.2, 0.7)),
      "horizon": rng.uniform(0.45, 0.75, n).astype(np.float32),
      "pole_x": rng.uniform(0.05, 0.95, n).astype(np.float32),
      "pole": _random_colours(rng, n, value=(0.1, 0.9)),
      "offset": rng.uniform(-0.08, 0.08, n).astype(np.float32),  # person's horizontal position, fraction of W
      "distance": rng.uniform(0.88, 1.05, n).astype(np.float32),
      "gain": (1.0 + config.camera_light * rng.uniform(-1, 1, n)).astype(np.float32),
      "tint": (1.0 + config.camera_tint * rng.uniform(-1, 1, (n, 3))).astype(np.float32),
  }


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What each image of a domain shows: identity row, camera, split and file name."""

  identity: np.ndarray  # (N,) row into the identity table
  camera: np.ndarray  # (N,) 0-based
  split: tuple[str, ...]
  filename: tuple[str, ...]


def _plan(rng, config) -> _Plan:
  num_ids = config.num_train_ids + config.num_test_ids
  identity, camera, split, filename = [], [], [], []
  for row in range(num_ids):
    pid = row + 1
    order = rng.permutation(config.num_cameras)
    for k in range(config.images_per_id):
      cam = int(order[k % config.num_cameras])
      if row < config.num_train_ids:
        which = "train"
      else:
        which = "query" if k < config.queries_per_id else "gallery"
      identity.append(row)
      camera.append(cam)
      split.append(which)
      filename.append(f"{pid:04d}_c{cam + 1}_{len(filename) + 1:04d}.png")
  return _Plan(np.array(identity), np.array(camera), tuple(split), tuple(filename))


def _draw_poses(rng, plan, cameras, config):
  """Per-image viewpoint and jitter."""
  n = len(plan.identity)
  usual = cameras["view"][plan.camera]
  view = np.where(rng.random(n) < config.view_consistency, usual, rng.integers(0, 3, n))
  return {
      "view": view,
      "dx": rng.uniform(-0.04, 0.04, n).astype(np.float32),
      "dy": rng.uniform(-0.02, 0.01, n).astype(np.float32),
      "scale": rng.uniform(0.96, 1.04, n).astype(np.float32),
      "stride": rng.uniform(0.0, 1.0, n).astype(np.float32),  # how far apart the legs are while walking
      "light": rng.uniform(0.94, 1.06, n).astype(np.float32),
  }


def _render_clean(ids, cams, poses, config):
  """Flat-shaded images (n, H, W, 3) in [0, 1] and the person masks (n, H, W) of one chunk."""
  h, w = config.height, config.width
  n = len(poses["view"])
  y = np.arange(h, dtype=np.float32)[None, :, None] + 0.5  # (1, H, 1) pixel centres
  x = np.arange(w, dtype=np.float32)[None, None, :] + 0.5  # (1, 1, W)

  def col(a):  # (n,) -> (n, 1, 1) for broadcasting against the pixel grid
    return np.asarray(a, np.float32)[:, None, None]

  # Background: wall above the horizon, floor below, one vertical pole.
  horizon = col(cams["horizon"]) * h
  floor = np.broadcast_to(y >= horizon, (n, h, w))
  pole = np.broadcast_to(np.abs(x - col(cams["pole_x"]) * w) < 1.0, (n, h, w))

  # Person geometry in pixels.
  view = col(poses["view"])
  side = view == SIDE
  height = col(ids["stature"] * cams["distance"] * poses["scale"]) * h
  foot = (0.97 + col(poses["dy"])) * h
  top = foot - height
  cx = (0.5 + col(cams["offset"] + poses["dx"])) * w
  narrow = np.where(side, SIDE_VIEW_WIDTH, 1.0)
  build = col(ids["build"])
  head_r = HEAD_RADIUS * height
  head_cy = top + head_r
  neck = top + 2.0 * head_r
  waist = top + WAIST * height
  shoulder = SHOULDER_HALF_WIDTH * height * build * narrow
  u = (y - neck) / (waist - neck)  # 0 at the neck, 1 at the waist
  dxp = x - cx
  stride = col(poses["stride"])

  torso = (u >= 0) & (u <= 1) & (np.abs(dxp) <= shoulder * (1.0 - 0.15 * u))
  arm_y = (y >= neck + 0.02 * height) & (y <= waist + 0.08 * height)
  arm_x = (np.abs(dxp) > shoulder) & (np.abs(dxp) <= shoulder + ARM_WIDTH * height)
  arms = arm_y & arm_x & ~side
  leg_half = LEG_HALF_WIDTH * height * build
  # Legs sit side by side from the front or back and spread front-to-back from the side.
  leg_offset = np.where(side, (0.3 + stride) * LEG_OFFSET * height,
                        LEG_OFFSET * height * build * (1 + 0.3 * stride))
  legs_y = (y >= waist) & (y <= foot)
  legs = legs_y & ((np.abs(dxp - leg_offset) <= leg_half) | (np.abs(dxp + leg_offset) <= leg_half))
  hips = (y >= waist) & (y <= waist + 0.08 * height) & (np.abs(dxp) <= leg_offset + leg_half)
  shoes = legs & (y >= foot - SHOE_HEIGHT * height)
  head = ((dxp / (0.85 * head_r)) ** 2 + ((y - head_cy) / head_r) ** 2) <= 1.0
  hair_front = head & (y < head_cy - 0.35 * head_r)
  hair_side = head & ((y < head_cy - 0.35 * head_r) | (dxp < -0.2 * head_r))
  hair = np.where(view == BACK, head, np.where(side, hair_side, hair_front))

  # Clothes.
  kind = col(ids["bottom_kind"])
  skirt = (kind == SKIRT) & (y >= waist) & (y <= waist + SKIRT_LENGTH * height) & (
      np.abs(dxp) <= shoulder * (0.85 + 0.5 * (y - waist) / (SKIRT_LENGTH * height)))
  bare_legs = legs & (((kind == SHORTS) & (y > waist + SHORTS_LENGTH * height)) | (kind == SKIRT))
  short_sleeves = ~col(ids["long_sleeves"]).astype(bool) & (y > neck + 0.45 * (waist - neck))

  period = col(ids["period"]) * height / 100.0 * 2.0
  pattern = col(ids["pattern"])
  stripe_h = np.floor((y - neck) / period) % 2 == 1
  stripe_v = np.floor((dxp + w) / period) % 2 == 1
  patterned = np.select(
      [pattern == H_STRIPES, pattern == V_STRIPES, pattern == CHECKER, pattern == TWO_TONE, pattern == LOGO],
      [stripe_h, stripe_v, stripe_h ^ stripe_v, u > 0.5,
       (view == FRONT) & (np.abs(dxp) < 0.4 * shoulder) & (u > 0.25) & (u < 0.6)],
      default=False,
  )

  bag = col(ids["bag"])
  on_back = (u > 0.1) & (u < 0.75)
  backpack_back = (bag == BACKPACK) & (view == BACK) & (np.abs(dxp) < 0.6 * shoulder) & on_back
  straps = (bag == BACKPACK) & (view == FRONT) & (np.abs(np.abs(dxp) - 0.55 * shoulder) < 0.6) & (u >= 0) & (
      u < 0.9)
  backpack_side = (bag == BACKPACK) & side & (dxp < -shoulder) & (dxp > -shoulder - 0.09 * height) & on_back
  shoulder_bag = (bag == SHOULDER_BAG) & (dxp > shoulder * 0.9) & (dxp < shoulder + 0.09 * height) & (
      y > waist - 0.06 * height) & (y < waist + 0.1 * height)

  # Painter's order: each layer covers the ones before it.
  layers = [
      (floor, cams["floor"]),
      (pole, cams["pole"]),
      (legs | hips, ids["bottom"]),
      (bare_legs, ids["skin"]),
      (skirt, ids["bottom"]),
      (shoes, ids["shoes"]),
      (arms, ids["top"]),
      (arms & short_sleeves, ids["skin"]),
      (torso, ids["top"]),
      (torso & patterned, ids["pattern_colour"]),
      (backpack_back | straps | backpack_side | shoulder_bag, ids["bag_colour"]),
      (head, ids["skin"]),
      (hair, ids["hair"]),
  ]
  label = np.zeros((n, h, w), np.int8)  # 0 = wall
  for index, (mask, _) in enumerate(layers, start=1):
    label = np.where(mask, np.int8(index), label)
  palette = np.stack([cams["wall"]] + [colour for _, colour in layers], axis=1)  # (n, layers + 1, 3)
  image = palette[np.arange(n)[:, None, None], label]
  person = label > 2

  light = (cams["gain"] * poses["light"])[:, None] * cams["tint"]  # (n, 3)
  image = image * light[:, None, None, :]
  return image.astype(np.float32), person, cx, shoulder


def _to_real(image, person, cx, shoulder, rng, config):
  """Renders flat images the way real footage looks; every effect is scaled by config.gap."""
  g = config.gap
  if g == 0:
    return image
  n, h, w, _ = image.shape
  x = np.arange(w, dtype=np.float32)[None, None, :] + 0.5
  y = np.arange(h, dtype=np.float32)[None, :, None] + 0.5
  # Cloth grain on people; blobs of clutter, mostly in brightness, on backgrounds.
  grain = ndimage.gaussian_filter(rng.standard_normal((n, h, w), np.float32), (0, GRAIN_SIGMA, GRAIN_SIGMA))
  grain /= grain.std() + 1e-6
  image = image * (1.0 + g * config.texture * np.where(person, grain, 0.0))[..., None]
  blob_sigma = h * CLUTTER_SCALE
  blobs = rng.standard_normal((n, h, w, 3), np.float32)
  blobs = ndimage.gaussian_filter(blobs, (0, blob_sigma, blob_sigma, 0))
  blobs = blobs.mean(-1, keepdims=True) + CLUTTER_CHROMA * (blobs - blobs.mean(-1, keepdims=True))
  blobs /= blobs.std() + 1e-6
  image = image + g * config.clutter * np.where(person[..., None], 0.0, blobs)
  # Light falls off across a round body and towards the corners of the frame.
  body = 1.0 - g * config.shading * np.clip(((x - cx) / (1.3 * shoulder)) ** 2, 0.0, 1.0)
  vignette = 1.0 - 0.5 * g * config.shading * (((x / w) - 0.5) ** 2 + ((y / h) - 0.5) ** 2) * 2.0
  image = image * (np.where(person, body, 1.0) * vignette)[..., None]
  # The camera's colour response: washed-out colours, a cast, a gamma.
  grey = (image @ LUMA)[..., None]
  image = image + g * config.desaturation * (grey - image)
  image = image * (1.0 + g * (np.asarray(config.colour_cast, np.float32) - 1.0))
  image = np.clip(image, 0.0, 1.0) ** (1.0 + g * (config.gamma - 1.0))
  # Optics and sensor.
  sigma = g * config.blur_sigma
  if sigma > 0:
    image = ndimage.gaussian_filter(image, (0, sigma, sigma, 0))
  return image + g * config.noise_std * rng.standard_normal(image.shape, np.float32)


def render_domain(config: ToyConfig, domain: str):
  """All images of a domain: (uint8 (N, H, W, 3), pids, 0-based camids, splits, file names)."""
  if domain not in DOMAINS:
    raise ValueError(f"unknown reid_toy domain {domain!r}; use one of {DOMAINS}.")
  domain_index = DOMAINS.index(domain)
  rng = np.random.default_rng([config.seed, domain_index])
  ids = _draw_identities(rng, config.num_train_ids + config.num_test_ids)
  camera_rng = np.random.default_rng([config.seed, len(DOMAINS)]) if config.shared_cameras else rng
  cams = _draw_cameras(camera_rng, config)
  plan = _plan(rng, config)
  poses = _draw_poses(rng, plan, cams, config)
  chunks = []
  for start in range(0, len(plan.identity), CHUNK):
    rows = slice(start, start + CHUNK)
    chunk_ids = {k: v[plan.identity[rows]] for k, v in ids.items()}
    chunk_cams = {k: v[plan.camera[rows]] for k, v in cams.items()}
    chunk_poses = {k: v[rows] for k, v in poses.items()}
    image, person, cx, shoulder = _render_clean(chunk_ids, chunk_cams, chunk_poses, config)
    if domain == "real":
      pixel_rng = np.random.default_rng([config.seed, domain_index, start])
      image = _to_real(image, person, cx, shoulder, pixel_rng, config)
    chunks.append(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8))
  pids = plan.identity + 1
  return np.concatenate(chunks), pids, plan.camera, plan.split, plan.filename


def write_domain(config: ToyConfig, domain: str, out_dir: str) -> str:
  """Writes a domain as a Market-style release into out_dir (atomically, once); returns out_dir."""
  if os.path.isfile(os.path.join(out_dir, CONFIG_FILE)):
    return out_dir
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp", dir=parent)
  try:
    images, _, _, splits, filenames = render_domain(config, domain)
    for folder in parsing.SPLIT_FOLDERS.values():
      os.makedirs(os.path.join(tmp_dir, folder))
    for image, split, name in zip(images, splits, filenames):
      Image.fromarray(image).save(os.path.join(tmp_dir, parsing.SPLIT_FOLDERS[split], name), format="PNG")
    with open(os.path.join(tmp_dir, CONFIG_FILE), "w") as f:
      json.dump({"domain": domain, **config.to_json()}, f, indent=2)
    try:
      os.rename(tmp_dir, out_dir)
    except OSError:
      if not os.path.isfile(os.path.join(out_dir, CONFIG_FILE)):  # not another process finishing first
        raise
  finally:
    if os.path.isdir(tmp_dir):
      shutil.rmtree(tmp_dir)
  return out_dir
