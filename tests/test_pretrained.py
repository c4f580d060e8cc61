"""config.model.pretrained_reid: create_train_state starts from the .npz of `import_torch --resnet50`.

The files here come from torchvision-layout state dicts of random numpy arrays at tiny widths, converted by
import_torch.convert_resnet50 as a real resnet50 .pth would be (no torch needed).
"""

import re

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import baseline, gta2market
from synth_reid_jax import features, sharding, train_state, trainer
from synth_reid_jax.errors import ConfigError
from synth_reid_jax.models import build_models
from synth_reid_jax.tools import import_torch

NUM_CLASSES = 6
WIDTH = 8  # the tiny configs' reid_width (and ngf)
STEM_BLOCKS = 3  # ResNetStem's layer1


def torchvision_state_dict(width, stages, seed=0):
  """Random values under torchvision's ResNet-50 keys (conv1, bn1, layer1-4 with downsample, fc)."""
  rng = np.random.default_rng(seed)
  sd = {"conv1.weight": rng.normal(0, 0.1, (width, 3, 7, 7))}

  def bn(prefix, c):
    sd.update({f"{prefix}.weight": rng.uniform(0.5, 1.5, c), f"{prefix}.bias": rng.normal(0, 0.1, c),
               f"{prefix}.running_mean": rng.normal(0, 0.1, c),
               f"{prefix}.running_var": rng.uniform(0.5, 1.5, c),
               f"{prefix}.num_batches_tracked": np.array(7)})

  bn("bn1", width)
  cin = width
  for stage, blocks in enumerate(stages):
    planes = width * 2 ** stage
    for j in range(blocks):
      p = f"layer{stage + 1}.{j}"
      convs = ((planes, cin, 1, 1), (planes, planes, 3, 3), (4 * planes, planes, 1, 1))
      for k, shape in enumerate(convs, start=1):
        sd[f"{p}.conv{k}.weight"] = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        bn(f"{p}.bn{k}", shape[0])
      if j == 0:
        sd[f"{p}.downsample.0.weight"] = rng.normal(0, np.sqrt(2 / cin), (4 * planes, cin, 1, 1))
        bn(f"{p}.downsample.1", 4 * planes)
      cin = 4 * planes
  sd["fc.weight"], sd["fc.bias"] = rng.normal(0, 0.01, (1000, cin)), np.zeros(1000)
  return sd


def write_weights(path, width=WIDTH, stages=(1, 1, 1), seed=0):
  import_torch.save_npz(path, import_torch.convert_resnet50(
      torchvision_state_dict(width, (STEM_BLOCKS, *stages), seed)))
  return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  return write_weights(tmp_path_factory.mktemp("weights") / "resnet50.npz")


def baseline_config(path=""):
  config = baseline.get_config("tiny")
  config.model.pretrained_reid = path
  return config


def method_config(path=""):
  config = gta2market.get_config("tiny")
  config.model.pretrained_reid = path
  return config


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def variables_of(state, network):
  out = {"params": state.params[network]}
  if network in state.batch_stats:
    out["batch_stats"] = state.batch_stats[network]
  return out


def assert_from_file(state, path, networks):
  """Every variable of `networks` that the file holds equals the file's value; -> how many there are."""
  loaded = import_torch.load_npz(path)
  n = 0
  for network in networks:
    want = flat(loaded[network])
    got = flat(variables_of(state, network))
    if network == "reid":
      want = {p: v for p, v in want.items() if p[1].startswith("layer")}
    assert want and set(want) <= set(got), network
    for p, value in want.items():
      np.testing.assert_array_equal(got[p], value, err_msg=f"{network}/{'/'.join(p)}")
    n += len(want)
  return n


def test_baseline_starts_from_the_file(weights):
  state, _ = train_state.create_train_state(baseline_config(weights), jax.random.key(0), NUM_CLASSES)
  random, _ = train_state.create_train_state(baseline_config(), jax.random.key(0), NUM_CLASSES)
  assert assert_from_file(state, weights, ("stem", "reid")) > 100
  # The classifier is not ImageNet's: it keeps its initialisation (torchreid's N(0, 0.01)).
  jax.tree.map(np.testing.assert_array_equal, state.params["reid"]["classifier"],
               random.params["reid"]["classifier"])
  # The first forward pass computes other features than from random weights.
  config = baseline_config()
  models = build_models(config, NUM_CLASSES)
  images = np.random.default_rng(0).uniform(-1, 1, (4, config.data.height, config.data.width, 3))
  embed = jax.jit(lambda v, x: features.embed(models, v, x, flip=False))
  pretrained_features, random_features = (
      embed({"params": s.params, "batch_stats": s.batch_stats}, images) for s in (state, random))
  assert pretrained_features.shape == (4, 32 * WIDTH)
  assert np.abs(np.asarray(pretrained_features) - np.asarray(random_features)).max() > 1e-3


def test_method_starts_r_stages_2_4_from_the_file(weights):
  """The method has no stem: the file's stem is unused, R's stages 2-4 load, the rest keeps its init."""
  state, _ = train_state.create_train_state(method_config(weights), jax.random.key(0), NUM_CLASSES)
  random, _ = train_state.create_train_state(method_config(), jax.random.key(0), NUM_CLASSES)
  assert "stem" not in state.params
  assert_from_file(state, weights, ("reid",))
  for network in ("generator", "discriminator", "projector"):
    jax.tree.map(np.testing.assert_array_equal, state.params[network], random.params[network])
  for name in ("bnneck", "classifier"):
    jax.tree.map(np.testing.assert_array_equal, state.params["reid"][name], random.params["reid"][name])


def test_trainers_compiled_init_loads_the_file_without_embedding_it(weights):
  """The trainer compiles create_train_state whole, replicated over the mesh: the file's values arrive at run
  time, not as constants of the program."""
  mesh = sharding.create_mesh()
  state, _ = trainer.create_replicated_state(baseline_config(weights), jax.random.key(0), NUM_CLASSES, mesh)
  assert_from_file(state, weights, ("stem", "reid"))
  assert state.params["stem"]["conv1"]["kernel"].sharding.is_fully_replicated

  def program(path):
    init = lambda key: train_state.create_train_state(baseline_config(path), key, NUM_CLASSES)[0]
    return jax.jit(init).lower(jax.random.key(0)).as_text()

  values = sum(v.size for v in flat(import_torch.load_npz(weights)).values())
  assert values > 100_000
  assert len(program(weights)) < len(program("")) + values  # as constants: > 10 characters per value


def test_abstract_states_read_no_file(tmp_path):
  missing = str(tmp_path / "nowhere.npz")
  abstract = jax.eval_shape(
      lambda key: train_state.create_train_state(baseline_config(missing), key, NUM_CLASSES,
                                                 pretrained=False)[0], jax.random.key(0))
  assert abstract.params["stem"]["conv1"]["kernel"].shape == (7, 7, 3, WIDTH)
  with pytest.raises(import_torch.WeightsFileMissingError, match=rf"{missing}.*import_torch --resnet50="):
    train_state.create_train_state(baseline_config(missing), jax.random.key(0), NUM_CLASSES)


@pytest.mark.parametrize("width, stages, first, fix", [
    (4, (1, 1, 1), r"shapes differ: \['stem/params/bn1/bias: \(4,\) in the file, \(8,\) in the model",
     r"reid_width=4 and config.model.reid_stages=\(1, 1, 1\)"),
    (WIDTH, (2, 1, 1), r"not in the model: \['reid/params/layer2/block_1/bn1/bias'",
     r"reid_stages=\(2, 1, 1\)"),
])
def test_a_file_of_other_sizes_names_the_keys_and_the_fix(tmp_path, width, stages, first, fix):
  path = write_weights(tmp_path / "other.npz", width, stages)
  for config in (baseline_config(path), method_config(path)):
    with pytest.raises(ConfigError) as error:
      train_state.create_train_state(config, jax.random.key(0), NUM_CLASSES)
    message = str(error.value)
    assert f"config.model.pretrained_reid={path} does not fit" in message
    assert re.search(fix, message), message
    assert "import_torch --resnet50=<pth> --output=<npz>" in message and "pretrained_reid=''" in message
  with pytest.raises(ConfigError, match=first):
    train_state.create_train_state(baseline_config(path), jax.random.key(0), NUM_CLASSES)


def test_a_file_without_the_stem_fits_the_method_only(tmp_path, weights):
  path = str(tmp_path / "stages_only.npz")
  import_torch.save_npz(path, {"reid": import_torch.load_npz(weights)["reid"]})
  state, _ = train_state.create_train_state(method_config(path), jax.random.key(0), NUM_CLASSES)
  assert_from_file(state, path, ("reid",))
  with pytest.raises(ConfigError, match=r"missing in the file: \['stem/params/bn1/bias'.*\(\d+ in all\)"):
    train_state.create_train_state(baseline_config(path), jax.random.key(0), NUM_CLASSES)


def test_a_file_that_is_not_an_npz_is_named(tmp_path):
  path = tmp_path / "resnet50.npz"
  path.write_text("not an archive")
  with pytest.raises(import_torch.WeightsFileError, match=rf"Cannot read {path} as an .npz"):
    train_state.create_train_state(baseline_config(str(path)), jax.random.key(0), NUM_CLASSES)


# --- The ImageNet files and the start-of-run notice ------------------------------------------------------


def _save_torch(path, state_dict, legacy):
  """A .pth as torchvision published it: resnet50-19c8e357.pth (2017) in torch's legacy format without
  BatchNorm's num_batches_tracked; resnet50-0676ba61.pth / -11ad3fa6.pth in the zip format with it."""
  torch = pytest.importorskip("torch")
  tensors = {k: torch.tensor(v, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
             for k, v in state_dict.items() if not (legacy and k.endswith("num_batches_tracked"))}
  torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
  return str(path)


def test_torchreids_and_torchvisions_resnet50_files_convert_alike(tmp_path):
  """The same key names in both files: the legacy 19c8e357 layout and the current zip one give one .npz."""
  state_dict = torchvision_state_dict(WIDTH, (STEM_BLOCKS, 1, 1, 1), seed=3)
  expected = traverse_util.flatten_dict(import_torch.convert_resnet50(state_dict))
  for name, legacy in (("resnet50-19c8e357.pth", True), ("resnet50-0676ba61.pth", False)):
    pth = _save_torch(tmp_path / name, state_dict, legacy)
    with open(pth, "rb") as f:
      assert (f.read(2) == b"PK") != legacy  # zip archive or legacy pickle
    npz = str(tmp_path / f"{name}.npz")
    import_torch.main([f"--resnet50={pth}", f"--output={npz}"])
    got = traverse_util.flatten_dict(import_torch.load_npz(npz))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=f"{name}: {'/'.join(key)}")


def test_a_baseline_from_random_weights_names_the_converter():
  notice = import_torch.missing_imagenet_notice(baseline.get_config())
  assert notice.startswith("NOTE: config.model.pretrained_reid is empty") and "\n" not in notice
  assert "python -m synth_reid_jax.tools.import_torch --resnet50=<pth> --output=<npz>" in notice
  given = baseline.get_config()
  given.model.pretrained_reid = "resnet50.npz"
  from configs import demo_baseline
  # The method trains R from scratch in the original; ImageNet weights do not fit the demo's or :tiny's sizes.
  for config in (given, gta2market.get_config(), demo_baseline.get_config(), baseline.get_config("tiny")):
    assert import_torch.missing_imagenet_notice(config) is None
