"""FID / KID: the Inception port against an independent torch model, the statistics against numpy, the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from synth_reid_jax.models import inception
from synth_reid_jax.tools import convert_inception, fid

# ----------------------------------------------------------------------------------------------------------
# Shared fixtures: random weights with activations that still depend on the input, and image folders.


def random_flat_variables(seed: int = 0) -> dict[str, np.ndarray]:
  """Every variable of the network: He-scaled kernels, BatchNorm near identity (input-driven features)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in inception.variable_shapes().items():
    leaf = name.rsplit("/", 1)[1]
    if leaf == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.8, 1.2, size=shape)
    else:
      value = rng.normal(size=shape) * 0.05
    flat[name] = value.astype(np.float32)
  return flat


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("weights") / "inception_fid.npz"
  inception.save_variables(path, random_flat_variables())
  return str(path)


def write_images(folder, sizes, seed=0, ext=".png"):
  """Random RGB images of the given (height, width) sizes, half of them in a nested folder."""
  rng = np.random.default_rng(seed)
  paths = []
  for i, (height, width) in enumerate(sizes):
    sub = folder / "nested" if i % 2 else folder
    sub.mkdir(parents=True, exist_ok=True)
    path = sub / f"img_{i:02d}{ext}"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    paths.append(str(path))
  return paths


MIXED_SIZES = ((64, 32), (40, 40), (64, 32), (17, 29), (301, 150))

# ----------------------------------------------------------------------------------------------------------
# Resizing as torch's F.interpolate(bilinear, align_corners=False).


def test_resize_matrix_is_torch_bilinear_on_known_values():
  np.testing.assert_allclose(inception.bilinear_resize_matrix(2, 4),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  # Downsampling by 2 averages pixel pairs (no antialiasing beyond the two taps).
  np.testing.assert_allclose(inception.bilinear_resize_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  np.testing.assert_array_equal(inception.bilinear_resize_matrix(5, 5), np.eye(5))
  for in_size, out_size in ((7, 299), (400, 299), (128, 299), (1, 3)):
    np.testing.assert_allclose(inception.bilinear_resize_matrix(in_size, out_size).sum(1), 1.0, rtol=1e-6)


def test_resize_numpy_and_jax_agree():
  images = np.random.default_rng(0).uniform(size=(2, 13, 7, 3)).astype(np.float32)
  host = inception.resize_bilinear(images, 29)
  device = jax.jit(lambda x: inception.resize_bilinear(x, 29))(jnp.asarray(images))
  assert host.shape == (2, 29, 29, 3)
  np.testing.assert_allclose(np.asarray(device), host, rtol=1e-6, atol=1e-6)


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  images = np.random.default_rng(1).uniform(size=(1, 3, 131, 47)).astype(np.float32)
  for size in (299, 33):
    expected = torch.nn.functional.interpolate(torch.from_numpy(images), size=(size, size), mode="bilinear",
                                               align_corners=False).numpy().transpose(0, 2, 3, 1)
    ours = inception.resize_bilinear(images.transpose(0, 2, 3, 1), size)
    np.testing.assert_allclose(ours, expected, atol=5e-6)  # float32 rounding in a different order


# ----------------------------------------------------------------------------------------------------------
# The network and the weight conversion against an independent torch model with pytorch-fid's module names.


def build_torch_reference(torch):
  """torchvision-named InceptionV3 with the FID graph's quirks, randomly initialised -> (model, forward)."""
  nn, F = torch.nn, torch.nn.functional

  class Basic(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
      self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def tf_avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  class BlockA(nn.Module):
    def __init__(self, cin, pool_features):
      super().__init__()
      self.branch1x1 = Basic(cin, 64, 1)
      self.branch5x5_1, self.branch5x5_2 = Basic(cin, 48, 1), Basic(48, 64, 5, padding=2)
      self.branch3x3dbl_1 = Basic(cin, 64, 1)
      self.branch3x3dbl_2 = Basic(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = Basic(96, 96, 3, padding=1)
      self.branch_pool = Basic(cin, pool_features, 1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        self.branch_pool(tf_avg_pool(x))], 1)

  class BlockB(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = Basic(cin, 384, 3, stride=2)
      self.branch3x3dbl_1 = Basic(cin, 64, 1)
      self.branch3x3dbl_2 = Basic(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = Basic(96, 96, 3, stride=2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        F.max_pool2d(x, 3, stride=2)], 1)

  class BlockC(nn.Module):
    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1 = Basic(cin, 192, 1)
      self.branch7x7_1 = Basic(cin, c7, 1)
      self.branch7x7_2 = Basic(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7_3 = Basic(c7, 192, (7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = Basic(cin, c7, 1)
      self.branch7x7dbl_2 = Basic(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = Basic(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = Basic(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = Basic(c7, 192, (1, 7), padding=(0, 3))
      self.branch_pool = Basic(cin, 192, 1)

    def forward(self, x):
      seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      double = x
      for i in range(1, 6):
        double = getattr(self, f"branch7x7dbl_{i}")(double)
      return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(tf_avg_pool(x))], 1)

  class BlockD(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1, self.branch3x3_2 = Basic(cin, 192, 1), Basic(192, 320, 3, stride=2)
      self.branch7x7x3_1 = Basic(cin, 192, 1)
      self.branch7x7x3_2 = Basic(192, 192, (1, 7), padding=(0, 3))
      self.branch7x7x3_3 = Basic(192, 192, (7, 1), padding=(3, 0))
      self.branch7x7x3_4 = Basic(192, 192, 3, stride=2)

    def forward(self, x):
      seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)

  class BlockE(nn.Module):
    def __init__(self, cin, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1 = Basic(cin, 320, 1)
      self.branch3x3_1 = Basic(cin, 384, 1)
      self.branch3x3_2a = Basic(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3_2b = Basic(384, 384, (3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = Basic(cin, 448, 1)
      self.branch3x3dbl_2 = Basic(448, 384, 3, padding=1)
      self.branch3x3dbl_3a = Basic(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = Basic(384, 384, (3, 1), padding=(1, 0))
      self.branch_pool = Basic(cin, 192, 1)

    def forward(self, x):
      a = self.branch3x3_1(x)
      b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
      return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                        self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)

  model = nn.Module()
  model.Conv2d_1a_3x3 = Basic(3, 32, 3, stride=2)
  model.Conv2d_2a_3x3 = Basic(32, 32, 3)
  model.Conv2d_2b_3x3 = Basic(32, 64, 3, padding=1)
  model.Conv2d_3b_1x1 = Basic(64, 80, 1)
  model.Conv2d_4a_3x3 = Basic(80, 192, 3)
  model.Mixed_5b, model.Mixed_5c, model.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
  model.Mixed_6a = BlockB(288)
  model.Mixed_6b, model.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
  model.Mixed_6d, model.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
  model.Mixed_7a = BlockD(768)
  model.Mixed_7b, model.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
  model.fc = nn.Linear(2048, 1008)  # in the released file, unused by the features

  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0, (2.0 / fan_in) ** 0.5, generator=generator)
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.8, 1.2, generator=generator)
        module.bias.normal_(0, 0.05, generator=generator)
        module.running_mean.normal_(0, 0.05, generator=generator)
        module.running_var.uniform_(0.8, 1.2, generator=generator)
  model.eval()

  def forward(images):
    """NCHW in [0, 1] -> {feature_dim: (N, dim)} as pytorch-fid (resize, [-1, 1], blocks, spatial mean)."""
    x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    outputs = {}
    with torch.no_grad():
      x = F.max_pool2d(model.Conv2d_2b_3x3(model.Conv2d_2a_3x3(model.Conv2d_1a_3x3(x))), 3, stride=2)
      outputs[64] = x.mean((2, 3))
      x = F.max_pool2d(model.Conv2d_4a_3x3(model.Conv2d_3b_1x1(x)), 3, stride=2)
      outputs[192] = x.mean((2, 3))
      for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                   "Mixed_6e"):
        x = getattr(model, name)(x)
      outputs[768] = x.mean((2, 3))
      x = model.Mixed_7c(model.Mixed_7b(model.Mixed_7a(x)))
      outputs[2048] = x.mean((2, 3))
    return {dim: value.numpy() for dim, value in outputs.items()}

  return model, forward


@pytest.mark.torch
def test_converted_pth_matches_torch_reference(tmp_path):
  torch = pytest.importorskip("torch")
  model, forward = build_torch_reference(torch)
  state_dict = model.state_dict()
  assert "Mixed_7c.branch3x3dbl_3b.bn.num_batches_tracked" in state_dict and "fc.weight" in state_dict
  checkpoint = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(state_dict, checkpoint)

  output = convert_inception.main([str(checkpoint), f"--output={tmp_path / 'fid.npz'}"])
  variables = inception.load_variables(output)
  # Every conv and BatchNorm tensor of the torch model has a place in ours and nothing else is needed.
  used = [name for name in state_dict
          if not name.startswith("fc.") and not name.endswith("num_batches_tracked")]
  assert len(used) == len(inception.variable_shapes()) == 470

  images = np.random.default_rng(0).uniform(size=(2, 3, 75, 41)).astype(np.float32)
  expected = forward(torch.from_numpy(images))
  for dim in (192, 2048):
    ours = jax.jit(inception.InceptionV3(feature_dim=dim).apply)(variables, images.transpose(0, 2, 3, 1))
    assert ours.shape == (2, dim)
    scale = np.abs(expected[dim]).max()
    np.testing.assert_allclose(np.asarray(ours), expected[dim], rtol=1e-4, atol=1e-4 * scale)
  # The two images differ in features, so the comparison above is not one of constants.
  assert np.abs(expected[2048][0] - expected[2048][1]).max() > 1e-3 * np.abs(expected[2048]).max()


def test_convert_state_dict_maps_names_and_layouts():
  flat = random_flat_variables(1)
  state_dict = {}
  for name, value in flat.items():
    if name.endswith("/kernel"):
      value = value.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> torch (out, in, kh, kw)
    state_dict["module." + convert_inception.torch_name(name)] = value
  state_dict["fc.weight"] = np.zeros((1008, 2048), np.float32)
  state_dict["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)
  assert convert_inception.torch_name("params/Mixed_7c/branch_pool/conv/kernel") == \
      "Mixed_7c.branch_pool.conv.weight"
  assert convert_inception.torch_name("batch_stats/Conv2d_1a_3x3/bn/var") == "Conv2d_1a_3x3.bn.running_var"
  converted = convert_inception.convert_state_dict(state_dict)
  assert converted.keys() == flat.keys()
  for name in flat:
    np.testing.assert_array_equal(converted[name], flat[name])

  with pytest.raises(ValueError, match="missing keys.*Mixed_5b.branch1x1.conv.weight"):
    convert_inception.convert_state_dict(
        {k: v for k, v in state_dict.items() if k != "module.Mixed_5b.branch1x1.conv.weight"})
  with pytest.raises(ValueError, match="unexpected keys.*Mixed_8a"):
    convert_inception.convert_state_dict({**state_dict, "Mixed_8a.conv.weight": np.zeros(1)})
  bad = dict(state_dict, **{"module.Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
  with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight has shape"):
    convert_inception.convert_state_dict(bad)


def test_convert_rejects_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    convert_inception.main([str(tmp_path / "nope.pth")])


# ----------------------------------------------------------------------------------------------------------
# FID and KID numbers.


def test_activation_statistics_match_numpy_definition():
  features = np.random.default_rng(0).normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6] + 3
  mu, sigma = fid.activation_statistics(features)
  centred = features - features.sum(0) / len(features)
  np.testing.assert_allclose(mu, features.sum(0) / len(features))
  np.testing.assert_allclose(sigma, centred.T @ centred / (len(features) - 1))
  with pytest.raises(ValueError, match="N >= 2"):
    fid.activation_statistics(features[:1])


def reference_frechet(mu1, sigma1, mu2, sigma2):
  """Tr sqrt(sigma1 sigma2) from the symmetric form sqrt(s1)^T s2 sqrt(s1), whose eigenvalues are the same."""
  values, vectors = np.linalg.eigh(sigma1)
  root1 = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
  return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def test_frechet_distance_matches_reference_on_random_features():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200, 8))
  b = rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 0.3
  stats_a, stats_b = fid.activation_statistics(a), fid.activation_statistics(b)
  value = fid.frechet_distance(*stats_a, *stats_b)
  np.testing.assert_allclose(value, reference_frechet(*stats_a, *stats_b), rtol=1e-8)
  assert value > 1.0
  np.testing.assert_allclose(fid.frechet_distance(*stats_b, *stats_a), value, rtol=1e-8)
  assert abs(fid.frechet_distance(*stats_a, *stats_a)) < 1e-8
  # Two Gaussians with equal covariances: only the means count.
  shift = np.arange(8.0)
  np.testing.assert_allclose(fid.frechet_distance(stats_a[0], stats_a[1], stats_a[0] + shift, stats_a[1]),
                             shift @ shift, rtol=1e-8)


def test_frechet_distance_of_singular_identical_statistics_is_zero():
  features = np.random.default_rng(0).normal(size=(5, 32))  # fewer samples than dims: rank-deficient
  stats = fid.activation_statistics(features)
  value = fid.frechet_distance(*stats, *stats)
  assert np.isfinite(value) and abs(value) < 1e-6 * np.trace(stats[1])


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="mismatched"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def loop_mmd2_unbiased(x, y):
  """The unbiased MMD^2 written out pair by pair with the cubic polynomial kernel."""
  dim, m = x.shape[1], len(x)

  def k(a, b):
    return (a @ b / dim + 1) ** 3

  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_matches_pairwise_reference():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(12, 5)), rng.normal(size=(9, 5)) + 0.5
  np.testing.assert_allclose(fid.mmd2_unbiased(a[:7], b[:7]), loop_mmd2_unbiased(a[:7], b[:7]), rtol=1e-10)

  mean, std = fid.kernel_inception_distance(a, b, num_subsets=10, subset_size=6, seed=3)
  draws = np.random.RandomState(3)
  reference = []
  for _ in range(10):
    x = a[draws.choice(len(a), 6, replace=False)]
    reference.append(loop_mmd2_unbiased(x, b[draws.choice(len(b), 6, replace=False)]))
  np.testing.assert_allclose([mean, std], [np.mean(reference), np.std(reference)], rtol=1e-10)
  assert std > 0


def test_kid_subset_size_is_capped_by_the_smaller_set():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(8, 4)), rng.normal(size=(11, 4))
  mean, _ = fid.kernel_inception_distance(a, b, num_subsets=5)  # default subset size 1000 -> 8
  draws = np.random.RandomState(fid.KID_SEED)
  expected = [fid.mmd2_unbiased(a[draws.choice(8, 8, replace=False)], b[draws.choice(11, 8, replace=False)])
              for _ in range(5)]
  np.testing.assert_allclose(mean, np.mean(expected), rtol=1e-12)


def test_kid_separates_distributions():
  rng = np.random.default_rng(2)
  a, same, shifted = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) + 1
  near, _ = fid.kernel_inception_distance(a, same, num_subsets=20, subset_size=100)
  far, _ = fid.kernel_inception_distance(a, shifted, num_subsets=20, subset_size=100)
  assert abs(near) < 0.05 * far
  with pytest.raises(ValueError, match="at least 2"):
    fid.kernel_inception_distance(a[:1], same)


# ----------------------------------------------------------------------------------------------------------
# Folders, features and the command line.


def test_extract_features_is_batching_and_padding_invariant(tmp_path, weights_file):
  paths = write_images(tmp_path / "a", MIXED_SIZES)
  variables = inception.load_variables(weights_file)
  whole = fid.extract_features(paths, variables, batch_size=8, feature_dim=64)
  pieces = fid.extract_features(paths, variables, batch_size=1, feature_dim=64)  # 4 devices -> batch 4
  assert whole.shape == (len(paths), 64) and whole.dtype == np.float64
  np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6)
  # Host-side resizing per image == resizing inside the network.
  single = Image.open(paths[-1]).convert("RGB")
  direct = inception.InceptionV3(feature_dim=64).apply(variables, np.asarray(single, np.float32)[None] / 255)
  np.testing.assert_allclose(whole[-1], np.asarray(direct)[0], rtol=1e-5, atol=1e-6)
  assert np.abs(whole[0] - whole[1]).max() > 1e-4


def test_fid_of_a_folder_against_itself_is_zero(tmp_path, weights_file, capsys):
  folder = tmp_path / "images"
  write_images(folder, MIXED_SIZES)
  write_images(folder / "jpegs", ((50, 30), (31, 60)), seed=1, ext=".JPEG")
  (folder / "Thumbs.db").write_bytes(b"not an image")
  write_images(tmp_path / "elsewhere", ((20, 10),), seed=2)
  (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
  result = fid.main([str(folder), str(folder), f"--weights={weights_file}", "--dims=192", "--batch_size=4",
                     "--kid", "--json"])
  printed = json.loads(capsys.readouterr().out)
  assert printed == result
  assert result["num_images_a"] == result["num_images_b"] == 8 and result["feature_dim"] == 192
  assert abs(result["fid"]) < 1e-5  # sqrtm of a rank-deficient product (8 images, 192 dims)
  # Every KID subset is the whole folder (8 < 1000), in another order.
  assert np.isfinite(result["kid_mean"]) and result["kid_std"] < 1e-12


def test_fid_grows_with_a_different_folder(tmp_path, weights_file):
  write_images(tmp_path / "a", MIXED_SIZES, seed=0)
  rng = np.random.default_rng(5)
  (tmp_path / "b").mkdir()
  for i in range(4):  # smooth dark images: a different distribution from uniform noise
    pixels = np.clip(rng.normal(40, 10, (1, 1, 3)) + np.zeros((48, 24, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "b" / f"{i}.jpg")
  result = fid.compare_folders(str(tmp_path / "a"), str(tmp_path / "b"), weights_file, batch_size=4,
                               feature_dim=64)
  assert result["fid"] > 1e-3 and result["num_images_b"] == 4
  # The thesis' preprocessing (every image to 128x64 first) changes the number but not its sign.
  resized = fid.compare_folders(str(tmp_path / "a"), str(tmp_path / "b"), weights_file, batch_size=4,
                                feature_dim=64, resize=(128, 64))
  assert resized["fid"] > 1e-3 and resized["fid"] != result["fid"]


def test_bad_inputs_give_clear_errors(tmp_path, weights_file):
  good = tmp_path / "good"
  write_images(good, MIXED_SIZES[:2])
  with pytest.raises(FileNotFoundError, match="image folder not found.*missing"):
    fid.compare_folders(str(tmp_path / "missing"), str(good), weights_file)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no images")
  with pytest.raises(ValueError, match="no .jpg/.jpeg/.png images under .*empty"):
    fid.compare_folders(str(good), str(empty), weights_file)
  single = tmp_path / "single"
  write_images(single, MIXED_SIZES[:1])
  with pytest.raises(ValueError, match="at least 2 images.*single.*has 1"):
    fid.compare_folders(str(good), str(single), weights_file)
  with pytest.raises(FileNotFoundError,
                     match="(?s)weights not found.*pt_inception-2015-12-05.*convert_inception"):
    fid.compare_folders(str(good), str(good), str(tmp_path / "inception_fid.npz"))
  partial = tmp_path / "partial.npz"
  flat = random_flat_variables()
  np.savez(partial, **{k: v for k, v in flat.items() if "Mixed_7c" not in k})
  with pytest.raises(ValueError, match="missing params/Mixed_7c"):
    fid.compare_folders(str(good), str(good), str(partial))
  broken = tmp_path / "broken"
  write_images(broken, MIXED_SIZES[:2])
  (broken / "zz_broken.png").write_bytes(b"\x89PNG truncated")
  with pytest.raises(ValueError, match="cannot read image.*zz_broken.png"):
    fid.extract_features(fid.list_images(broken), inception.load_variables(weights_file), feature_dim=64)
  with pytest.raises(SystemExit):
    fid.parse_args([str(good), str(good)])  # --weights is required
  assert fid.parse_args([str(good), str(good), "--weights=w.npz", "--resize=128x64"]).resize == (128, 64)
  with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
    fid.parse_size("128by64")
  with pytest.raises(ValueError, match="feature_dim=100"):
    jax.eval_shape(inception.InceptionV3(feature_dim=100).init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))


def test_load_variables_round_trip(weights_file):
  variables = inception.load_variables(weights_file)
  assert set(variables) == {"params", "batch_stats"}
  flat = traverse_util.flatten_dict(variables, sep="/")
  assert {name: tuple(v.shape) for name, v in flat.items()} == inception.variable_shapes()
  assert os.path.basename(weights_file) == "inception_fid.npz"
