"""FID and KID between two folders of images, on the pool3 features of the FID InceptionV3.

  python -m synth_reid_jax.tools.fid <dir_a> <dir_b> --weights=inception_fid.npz \
      [--batch_size=50] [--kid] [--json]

FID follows pytorch-fid (features, statistics, the Frechet distance with scipy's sqrtm); KID is the unbiased
polynomial-kernel MMD averaged over random subsets, as torch-fidelity computes it. Images (.jpg/.jpeg/.png,
any size, searched recursively) are resized to 299x299 on the host, so a folder may mix sizes.
"""

import argparse
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import tqdm
from PIL import Image
from scipy import linalg

from synth_reid_jax import sharding
from synth_reid_jax.datasets.images import to_rgb
from synth_reid_jax.models import inception

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PIXEL_MAX = 255.0  # uint8 images are mapped to [0, 1] first, as torchvision's ToTensor
DEFAULT_BATCH_SIZE = 50  # pytorch-fid's default
MAX_LOADER_THREADS = 8
FID_EPS = 1e-6  # pytorch-fid adds eps * I to both covariances when the product's square root is not finite
FID_IMAG_ATOL = 1e-3  # pytorch-fid's tolerance for imaginary parts left on sqrtm's diagonal
# KID as in torch-fidelity (Binkowski et al.): k(x, y) = (gamma <x, y> + coef0) ^ degree with gamma = 1 / dim.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3
KID_COEF0 = 1.0
KID_SEED = 2020  # torch-fidelity's default seed for drawing the subsets


def list_images(folder: str | os.PathLike) -> list[str]:
  """Every .jpg/.jpeg/.png file under `folder` (recursively, through symlinks, any case), sorted."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder not found: {folder!r}")
  paths = sorted(
      os.path.join(root, name) for root, _, names in os.walk(folder, followlinks=True) for name in names
      if name.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {folder!r}")
  return paths


def parse_size(text: str) -> tuple[int, int]:
  """"128x64" -> (128, 64): height x width."""
  try:
    height, width = (int(part) for part in text.lower().split("x"))
  except ValueError:
    height = width = 0
  if height < 1 or width < 1:
    raise ValueError(f"image size {text!r} is not HEIGHTxWIDTH with positive integers, e.g. 128x64")
  return height, width


def load_image(path: str, resize: tuple[int, int] | None = None) -> np.ndarray:
  """One image as float32 (299, 299, 3) in [0, 1], resized as pytorch-fid's network does.

  resize=(height, width) first resizes the image with PIL's bilinear filter, as the folders the thesis
  measured FID on were written (128x64) - a preprocessing choice, not part of FID.
  """
  try:
    with Image.open(path) as image:
      image = to_rgb(image, f"image {path}")
      if resize is not None:
        image = image.resize(resize[::-1], Image.BILINEAR)
      pixels = np.asarray(image, np.float32) / PIXEL_MAX
  except OSError as error:
    raise ValueError(f"cannot read image {path!r}: {error}") from error
  return inception.resize_bilinear(pixels, inception.FID_IMAGE_SIZE)


def _image_batches(paths: Sequence[str], batch_size: int,
                   resize: tuple[int, int] | None) -> Iterator[tuple[np.ndarray, int]]:
  """(batch_size, 299, 299, 3) arrays, the last one zero-padded, with the number of real images in each."""
  threads = min(MAX_LOADER_THREADS, os.cpu_count() or 1)
  load = functools.partial(load_image, resize=resize)
  with ThreadPoolExecutor(threads) as pool:
    for start in range(0, len(paths), batch_size):
      images = np.stack(list(pool.map(load, paths[start:start + batch_size])))
      count = len(images)
      if count < batch_size:
        images = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)])
      yield images, count


def extract_features(paths: Sequence[str], variables, batch_size: int = DEFAULT_BATCH_SIZE,
                     feature_dim: int = inception.POOL3_DIM, *,
                     resize: tuple[int, int] | None = None) -> np.ndarray:
  """float64 (len(paths), feature_dim) Inception features, in jitted batches split over the local devices."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not paths:
    raise ValueError("extract_features needs at least one image path")
  mesh = sharding.create_mesh(jax.local_devices())
  num_devices = mesh.devices.size
  # One compiled shape: never larger than the folder, always a multiple of the device count.
  batch_size = -(-min(batch_size, len(paths)) // num_devices) * num_devices
  model = inception.InceptionV3(feature_dim=feature_dim, resize_input=False)
  replicated = sharding.replicated_sharding(mesh)
  apply = jax.jit(model.apply, in_shardings=(replicated, sharding.batch_sharding(mesh)),
                  out_shardings=replicated)
  variables = sharding.replicate(variables, mesh)
  features = np.empty((len(paths), feature_dim), np.float64)
  done, pending = 0, None
  progress = tqdm.tqdm(total=len(paths), unit="img", desc="inception", file=sys.stderr)
  # The next batch is read while the device works on the previous one.
  for images, count in _image_batches(paths, batch_size, resize):
    outputs = apply(variables, images)
    if pending is not None:
      done = _store(features, done, *pending, progress)
    pending = outputs, count
  if pending is not None:
    _store(features, done, *pending, progress)
  progress.close()
  return features


def _store(features: np.ndarray, start: int, outputs: jax.Array, count: int, progress) -> int:
  features[start:start + count] = np.asarray(outputs)[:count]
  progress.update(count)
  return start + count


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of (N, D) features, as pytorch-fid."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"FID statistics need (N >= 2, D) features, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)) with pytorch-fid's numerical safeguards."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logger.warning("FID: the covariance product is singular; adding %g to both covariances' diagonals", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=FID_IMAG_ATOL):
      raise ValueError(f"FID: sqrtm left an imaginary component of {np.max(np.abs(covmean.imag))}; "
                       "the statistics are too ill-conditioned (use more images)")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  """scipy's matrix square root without its singularity warning (pytorch-fid asks for none: disp=False)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    return linalg.sqrtm(matrix)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE, gamma: float | None = None,
                      coef0: float = KID_COEF0) -> np.ndarray:
  """(gamma <x_i, y_j> + coef0) ^ degree for (N, D) x and (M, D) y; gamma defaults to 1 / D."""
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE, gamma: float | None = None,
                  coef0: float = KID_COEF0) -> float:
  """Unbiased squared MMD between two equally sized samples under the polynomial kernel."""
  m = len(x)
  if len(y) != m or m < 2:
    raise ValueError(f"the unbiased MMD needs two samples of the same size >= 2, got {len(x)} and {len(y)}")
  k_xx = polynomial_kernel(x, x, degree, gamma, coef0)
  k_yy = polynomial_kernel(y, y, degree, gamma, coef0)
  k_xy = polynomial_kernel(x, y, degree, gamma, coef0)
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, num_subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED,
                              degree: int = KID_DEGREE, gamma: float | None = None,
                              coef0: float = KID_COEF0) -> tuple[float, float]:
  """KID: mean and std of the unbiased MMD^2 over `num_subsets` random subsets of min(subset_size, N) each."""
  features_a = np.asarray(features_a, np.float64)
  features_b = np.asarray(features_b, np.float64)
  if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
    raise ValueError(f"KID needs (N, D) and (M, D) features, got {features_a.shape} and {features_b.shape}")
  size = min(subset_size, len(features_a), len(features_b))
  if size < 2:
    raise ValueError(f"KID needs at least 2 images per set, got {len(features_a)} and {len(features_b)}")
  if size < subset_size:
    logger.info("KID: subsets of %d images (fewer than %d available)", size, subset_size)
  rng = np.random.RandomState(seed)  # the legacy generator draws the same subsets as torch-fidelity
  mmds = np.empty(num_subsets)
  for i in range(num_subsets):
    x = features_a[rng.choice(len(features_a), size, replace=False)]
    y = features_b[rng.choice(len(features_b), size, replace=False)]
    mmds[i] = mmd2_unbiased(x, y, degree, gamma, coef0)
  return float(mmds.mean()), float(mmds.std())


def compare_folders(dir_a: str, dir_b: str, weights: str, batch_size: int = DEFAULT_BATCH_SIZE, *,
                    kid: bool = False, feature_dim: int = inception.POOL3_DIM, kid_subsets: int = KID_SUBSETS,
                    kid_subset_size: int = KID_SUBSET_SIZE,
                    resize: tuple[int, int] | None = None) -> dict[str, float | int]:
  """FID (and optionally KID) between the images of two folders: {"fid", "num_images_a", ...}."""
  paths = {name: list_images(folder) for name, folder in (("a", dir_a), ("b", dir_b))}
  for name, folder in (("a", dir_a), ("b", dir_b)):
    if len(paths[name]) < 2:
      raise ValueError(f"FID needs at least 2 images per folder; {folder!r} has {len(paths[name])}")
  variables = inception.load_variables(weights)
  features = {name: extract_features(paths[name], variables, batch_size, feature_dim, resize=resize)
              for name in paths}
  result = {"fid": frechet_distance(*activation_statistics(features["a"]),
                                    *activation_statistics(features["b"])),
            "num_images_a": len(paths["a"]), "num_images_b": len(paths["b"]), "feature_dim": feature_dim}
  if kid:
    result["kid_mean"], result["kid_std"] = kernel_inception_distance(
        features["a"], features["b"], kid_subsets, kid_subset_size)
  return result


def _size_argument(text: str) -> tuple[int, int]:
  try:
    return parse_size(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from error


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m synth_reid_jax.tools.fid", description=__doc__.splitlines()[0],
      epilog=inception.WEIGHTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dir_a", help="first image folder (e.g. translated images)")
  parser.add_argument("dir_b", help="second image folder (e.g. the real train images)")
  parser.add_argument("--weights", required=True, help="FID Inception .npz from tools.convert_inception")
  parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per jitted batch")
  parser.add_argument("--dims", type=int, default=inception.POOL3_DIM, choices=inception.FEATURE_DIMS,
                      help="feature width (2048 = pool3, the standard FID)")
  parser.add_argument("--kid", action="store_true", help="also report KID (mean and std over subsets)")
  parser.add_argument("--kid_subsets", type=int, default=KID_SUBSETS, help="KID: number of random subsets")
  parser.add_argument("--kid_subset_size", type=int, default=KID_SUBSET_SIZE,
                      help="KID: images per subset (capped by the smaller folder)")
  parser.add_argument("--resize", type=_size_argument, default=None, metavar="HxW",
                      help="first resize every image to HxW (PIL bilinear), e.g. 128x64 as in the thesis")
  parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float | int]:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  result = compare_folders(args.dir_a, args.dir_b, args.weights, args.batch_size, kid=args.kid,
                           feature_dim=args.dims, kid_subsets=args.kid_subsets,
                           kid_subset_size=args.kid_subset_size, resize=args.resize)
  if args.json:
    print(json.dumps(result))
  else:
    print(f"FID: {result['fid']:.4f}  ({result['num_images_a']} vs {result['num_images_b']} images)")
    if args.kid:
      print(f"KID: {result['kid_mean']:.6f} +- {result['kid_std']:.6f}")
  return result


if __name__ == "__main__":
  main()
