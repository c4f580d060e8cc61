"""The networks: shapes, the thesis setting's parameter counts, layer taps, the building blocks' numerics."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from synth_reid_jax.models import (
  Discriminator,
  Generator,
  Projector,
  ReIDNet,
  ResNetStem,
  build_models,
  frozen_params_mask,
  layers,
  sample_patch_ids,
)

NGF, N_BLOCKS, NDF, DIM, WIDTH, STAGES, CLASSES = 4, 2, 4, 8, 4, (1, 1, 1), 6
N, H, W = 2, 32, 16
NCE_LAYERS = (0, 2, 3, 4, 5)
sample_ids = jax.jit(sample_patch_ids, static_argnums=2)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def normal(seed, shape):
  """Test inputs from numpy (jax.random would compile a generator for every shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def images(n=N, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, H, W, 3)), jnp.float32)


def fake_variables(init, *args, seed=0):
  """Variables of the shapes `init` makes, filled from numpy: running the initialisers means compiling the
  random number generator, which costs seconds per network on CPU."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape), jnp.float32)
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
    return jnp.asarray(0.1 * rng.normal(size=shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init, jax.random.PRNGKey(0), *args))


@pytest.fixture(scope="module")
def generator_vars():
  return fake_variables(Generator(ngf=NGF, n_blocks=N_BLOCKS).init, images())


@pytest.fixture(scope="module")
def reid_vars():
  x = jnp.ones((N, H // 4, W // 4, 4 * NGF))
  model = ReIDNet(CLASSES, stages=STAGES, width=WIDTH)
  return fake_variables(lambda k, x: model.init(k, x, train=False), x, seed=1)


# --- the thesis setting at full size (shapes only, no compute) ----------------------------------------------

def test_full_size_parameter_counts():
  config = default.get_config()
  models = build_models(config, num_classes=538)
  rng = jax.random.PRNGKey(0)
  image = jax.ShapeDtypeStruct((1, 256, 128, 3), jnp.float32)
  g = jax.eval_shape(models.generator.init, rng, image)
  feats = jax.eval_shape(lambda v, x: models.generator.apply(
      v, x, layers=tuple(config.loss.nce_layers), encode_only=True), g, image)
  assert [f.shape[-1] for f in feats] == [3, 128, 256, 256, 256]
  f = jax.eval_shape(models.projector.init, rng, feats)
  encoded = jax.eval_shape(lambda v, x: models.generator.apply(v, x, method="encoder_output"), g, image)
  assert encoded.shape == (1, 64, 32, 256)
  r = jax.eval_shape(lambda k, x: models.reid.init(k, x, train=False), rng, encoded)
  d = jax.eval_shape(models.discriminator.init, rng, image)
  assert count(g["params"]) == 11_375_235
  assert count(d["params"]) == 2_763_841
  assert count(f["params"]) == 560_384
  assert count(r["params"]) == 24_389_146  # includes the frozen BNNeck shift
  assert jax.eval_shape(models.discriminator.apply, d, image).shape == (1, 32, 16, 1)
  neck = jax.eval_shape(lambda v, x: models.reid.apply(v, x, train=False), r, encoded)
  assert neck.shape == (1, 2048)


def test_resnet50_stem_matches_the_encoder_output_shape():
  config = default.get_config()
  config.model.backbone = "resnet50"
  models = build_models(config, num_classes=10)
  image = jax.ShapeDtypeStruct((2, 256, 128, 3), jnp.float32)
  v = jax.eval_shape(lambda k, x: models.stem.init(k, x, train=False), jax.random.PRNGKey(0), image)
  assert count(v["params"]) == 9_408 + 128 + 215_808  # torchvision's conv1 + bn1 + layer1
  out = jax.eval_shape(lambda v, x: models.stem.apply(v, x, train=False), v, image)
  assert out.shape == (2, 64, 32, 256)


def test_resnet50_plain_is_torchvisions_resnet50_without_its_fc():
  config = default.get_config()
  config.model.backbone = "resnet50_plain"
  models = build_models(config, num_classes=10)
  rng, image = jax.random.PRNGKey(0), jax.ShapeDtypeStruct((2, 256, 128, 3), jnp.float32)
  stem = jax.eval_shape(lambda k, x: models.stem.init(k, x, train=False), rng, image)
  features = jax.eval_shape(lambda v, x: models.stem.apply(v, x, train=False), stem, image)
  reid = jax.eval_shape(lambda k, x: models.reid.init(k, x, train=False), rng, features)
  assert set(reid["params"]) == {"layer2", "layer3", "layer4", "classifier"}  # no BNNeck
  classifier = count(reid["params"]["classifier"])
  assert classifier == 2048 * 10 + 10
  # torchvision's resnet50: 25,557,032 parameters, of which its fc (2048 -> 1000) holds 2,049,000.
  assert count(stem["params"]) + count(reid["params"]) - classifier == 25_557_032 - 2_049_000
  assert jax.eval_shape(lambda v, x: models.reid.apply(v, x, train=False), reid, features).shape == (2, 2048)


def test_plain_head_classifies_and_returns_the_pooled_feature():
  model = ReIDNet(CLASSES, stages=STAGES, width=WIDTH, neck="none")
  x = normal(10, (4, H // 4, W // 4, 4 * NGF))
  v = fake_variables(lambda k, x: model.init(k, x, train=False), x, seed=2)
  assert set(v["params"]) == {"layer2", "layer3", "layer4", "classifier"}
  run = jax.jit(lambda v, x: (model.apply(v, x, train=False),
                              model.apply(v, x, train=True, mutable=["batch_stats"])[0]))
  feature, (logits, pooled) = run(v, x)
  assert feature.shape == (4, 32 * WIDTH)
  c = v["params"]["classifier"]
  np.testing.assert_allclose(logits, pooled @ c["kernel"] + c["bias"], rtol=1e-5, atol=1e-5)
  assert not any(jax.tree.leaves(frozen_params_mask(v["params"])))  # nothing frozen without a BNNeck
  with pytest.raises(ValueError, match="neck='bn'.*'bnneck', 'none'"):
    ReIDNet(CLASSES, stages=STAGES, width=WIDTH, neck="bn").init(jax.random.PRNGKey(0), x, train=False)


def test_plain_resnet50_is_initialised_as_torchreid():
  """torchreid's ResNet._init_params: convs kaiming-normal over fan_out, nn.Linear N(0, 0.01) with bias 0."""
  config = default.get_config()
  config.model.backbone = "resnet50_plain"
  config.model.reid_stages, config.model.reid_width = (1, 1, 1), 16
  reid = build_models(config, num_classes=500).reid
  v = jax.jit(lambda k: reid.init(k, jnp.zeros((1, 8, 4, 64)), train=False))(jax.random.PRNGKey(0))
  classifier = v["params"]["classifier"]
  assert np.std(classifier["kernel"]) == pytest.approx(0.01, rel=0.05)
  np.testing.assert_array_equal(classifier["bias"], 0.0)
  kernel = v["params"]["layer4"]["block_0"]["conv3"]["kernel"]  # 1x1, 128 -> 512: fan_out 512
  assert np.std(kernel) == pytest.approx(np.sqrt(2 / 512), rel=0.05)
  config.model.backbone = "resnet50"  # R's own head: the original's weights_init_kaiming (fan_in)
  v = jax.jit(lambda k: build_models(config, 500).reid.init(k, jnp.zeros((1, 8, 4, 64)), train=False))(
      jax.random.PRNGKey(0))
  assert np.std(v["params"]["layer4"]["block_0"]["conv3"]["kernel"]) == pytest.approx(np.sqrt(2 / 128),
                                                                                      rel=0.05)


def test_build_models_reads_the_config():
  config = ml_collections.ConfigDict({"model": dict(
      ngf=NGF, n_blocks=N_BLOCKS, ndf=NDF, projector_dim=DIM, reid_stages=STAGES, reid_width=WIDTH,
      dtype="bfloat16", remat=True)})
  models = build_models(config, CLASSES)
  assert models.stem is None
  assert (models.generator.ngf, models.generator.n_blocks, models.generator.remat) == (NGF, N_BLOCKS, True)
  assert models.generator.dtype == jnp.bfloat16 and models.reid.dtype == jnp.bfloat16
  assert (models.discriminator.ndf, models.projector.dim) == (NDF, DIM)
  assert (models.reid.num_classes, models.reid.stages, models.reid.width) == (CLASSES, STAGES, WIDTH)
  config.model.backbone = "vgg"
  with pytest.raises(ValueError, match="backbone='vgg'"):
    build_models(config, CLASSES)


# --- generator ----------------------------------------------------------------------------------------------

def test_generator_shapes_and_taps(generator_vars):
  model = Generator(ngf=NGF, n_blocks=N_BLOCKS)
  x = images()
  all_layers = tuple(range(4 + N_BLOCKS))

  @jax.jit
  def run(v, x):
    image, feats = model.apply(v, x, layers=all_layers)
    return image, feats, model.apply(v, x), model.apply(v, x, method="encoder_output")

  image, feats, image_only, encoded = run(generator_vars, x)
  assert image.shape == (N, H, W, 3) and image.dtype == jnp.float32
  assert float(jnp.abs(image).max()) <= 1.0
  shapes = [f.shape for f in feats]
  assert shapes == [(N, H + 6, W + 6, 3), (N, H, W, NGF), (N, H // 2, W // 2, 2 * NGF)] + \
      [(N, H // 4, W // 4, 4 * NGF)] * (1 + N_BLOCKS)
  np.testing.assert_array_equal(feats[0], jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="reflect"))
  np.testing.assert_array_equal(image, image_only)
  np.testing.assert_array_equal(encoded, feats[-1])


def test_encode_only_stops_after_the_last_requested_layer(generator_vars):
  model = Generator(ngf=NGF, n_blocks=N_BLOCKS)
  x = images()
  convs = lambda **kw: str(jax.make_jaxpr(lambda v, x: model.apply(v, x, **kw))(generator_vars, x)).count(
      "conv_general_dilated")
  assert convs(layers=(0, 2), encode_only=True) == 2  # conv_in, down_0
  assert convs(layers=(4,), encode_only=True) == 3 + 2  # + down_1 and the first block's two convs
  # everything: the decoder's transposed convs run as 4 phase convs each
  assert convs(layers=(0, 2)) == 3 + 2 * N_BLOCKS + 2 * 4 + 1
  early, (_, full) = jax.jit(lambda v, x: (model.apply(v, x, layers=(3, 0), encode_only=True),
                                           model.apply(v, x, layers=(3, 0))))(generator_vars, x)
  assert [f.shape for f in early] == [(N, H // 4, W // 4, 4 * NGF), (N, H + 6, W + 6, 3)]
  for a, b in zip(early, full):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="encode_only=True needs"):
    jax.eval_shape(lambda v, x: model.apply(v, x, encode_only=True), generator_vars, x)
  with pytest.raises(ValueError, match=r"\[6\] out of range; valid are 0..5"):
    jax.eval_shape(lambda v, x: model.apply(v, x, layers=(6,)), generator_vars, x)


def test_remat_and_bfloat16(generator_vars):
  x = images()
  models = {"f32": Generator(ngf=NGF, n_blocks=N_BLOCKS),
            "remat": Generator(ngf=NGF, n_blocks=N_BLOCKS, remat=True),
            "bf16": Generator(ngf=NGF, n_blocks=N_BLOCKS, dtype=jnp.bfloat16)}

  @jax.jit
  def run(v):
    out = {}
    for name, model in models.items():
      loss = lambda v, model=model: jnp.mean(jnp.square(model.apply(v, x)))
      out[name] = jax.value_and_grad(loss)(v) + (model.apply(v, x, layers=(2,)),)
    return out

  out = run(generator_vars)
  value, grads, _ = out["f32"]
  value_remat, grads_remat, _ = out["remat"]
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_remat, grads)
  value_bf16, grads_bf16, (image, feats) = out["bf16"]
  assert image.dtype == jnp.float32 and feats[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(image, out["f32"][2][0], atol=0.1)
  np.testing.assert_allclose(value_bf16, value, rtol=0.05)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_bf16))
  shapes = jax.eval_shape(models["bf16"].init, jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))


def test_generator_biases_as_the_original(generator_vars):
  p = generator_vars["params"]
  assert set(p["block_0"]["conv_1"]) == {"kernel", "bias"} and set(p["block_0"]["conv_0"]) == {"kernel"}
  assert set(p["conv_out"]) == {"kernel", "bias"} and set(p["conv_in"]) == {"kernel"}
  assert set(p["up_0"]) == {"kernel"} and p["up_0"]["kernel"].shape == (3, 3, 4 * NGF, 2 * NGF)


def test_initialisers_follow_the_original():
  cases = [
      (layers.conv_init, (3, 3, 64, 32), 3 * 3 * 64),  # kaiming normal over fan_in = k*k*in
      # torch takes a ConvTranspose2d weight's "fan_in" from its dim 1 (out channels): k*k*out
      (layers.conv_transpose_init, (3, 3, 32, 64), 3 * 3 * 64),
      (layers.dense_init, (96, 256), 256),  # linear: kaiming normal over fan_out
  ]
  projector, feats = Projector(dim=DIM), [jnp.zeros((1, 1, 1, 3))]

  @jax.jit
  def draw(key):
    inits = [projector.init(k, feats) for k in (key, key, jax.random.PRNGKey(1))]
    return [init(key, shape) for init, shape, _ in cases] + [layers.bnneck_scale_init(key, (4096,))], inits

  draws, (first, again, other) = draw(jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, first, again)  # deterministic in the key
  kernel = lambda v: v["params"]["mlp_0"]["dense_1"]["kernel"]
  assert not np.array_equal(kernel(first), kernel(other))
  np.testing.assert_array_equal(first["params"]["mlp_0"]["dense_1"]["bias"], 0.0)
  for w, (_, _, fan) in zip(draws, cases):
    assert abs(float(w.std()) / np.sqrt(2.0 / fan) - 1) < 0.03 and abs(float(w.mean())) < 0.01
  assert abs(float(draws[-1].mean()) - 1) < 0.002 and abs(float(draws[-1].std()) - 0.02) < 0.002  # N(1, 0.02)


# --- discriminator ------------------------------------------------------------------------------------------

def test_discriminator_shapes_and_taps():
  model = Discriminator(ndf=NDF)
  x = images()
  v = fake_variables(model.init, x, seed=2)
  out, feats = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, layers=tuple(range(6)))))(v, x)
  assert out.shape == (N, H // 8, W // 8, 1) and out.dtype == jnp.float32
  assert [f.shape for f in feats] == [(N, 16, 8, NDF), (N, 16, 8, NDF), (N, 8, 4, 2 * NDF),
                                      (N, 4, 2, 4 * NDF), (N, 3, 3, 8 * NDF), (N, 4, 2, 1)]
  np.testing.assert_array_equal(feats[-1], out)
  np.testing.assert_array_equal(feats[1], jax.nn.leaky_relu(feats[0], 0.2))
  assert str(jax.make_jaxpr(lambda v, x: model.apply(v, x, layers=(1, 2)))(v, x)).count("conv_general") == 2


# --- projector ----------------------------------------------------------------------------------------------

def test_sample_patch_ids_without_replacement():
  feats = [jnp.zeros((N, 8, 4, 3)), jnp.zeros((N, 16, 16, 5))]
  ids = sample_ids(jax.random.PRNGKey(0), feats, 64)
  assert [i.shape for i in ids] == [(32,), (64,)]  # min(num_patches, H*W)
  assert all(i.dtype == jnp.int32 for i in ids)
  assert sorted(np.asarray(ids[0]).tolist()) == list(range(32))
  assert len(set(np.asarray(ids[1]).tolist())) == 64 and int(ids[1].max()) < 256
  again = sample_ids(jax.random.PRNGKey(0), feats, 64)
  np.testing.assert_array_equal(again[1], ids[1])
  assert not np.array_equal(sample_ids(jax.random.PRNGKey(1), feats, 64)[1], ids[1])


def test_projector_l2_normalised_and_ids_shared_across_the_batch():
  one = normal(3, (1, 8, 4, 16))
  feats = [jnp.concatenate([one, one]), normal(4, (N, 4, 2, 3))]
  ids = sample_ids(jax.random.PRNGKey(5), feats, 6)
  model = Projector(dim=DIM)
  v = fake_variables(model.init, feats, ids, seed=6)
  flat = feats[1].reshape(N, -1, 3)
  picked = flat[:, ids[1]].reshape(N * 6, 1, 1, 3)
  out, direct = jax.jit(lambda v: (model.apply(v, feats, ids), model.apply(v, [feats[0], picked])[1]))(v)
  assert [o.shape for o in out] == [(N * 6, DIM), (N * 6, DIM)]
  for o in out:
    np.testing.assert_allclose(jnp.linalg.norm(o, axis=-1), 1.0, atol=1e-6)
  # Identical images -> identical embeddings: the same positions are taken from every image.
  np.testing.assert_array_equal(out[0][:6], out[0][6:])
  # Row p of image n is the MLP of position ids[p] (no ids: every position).
  np.testing.assert_allclose(out[1], direct, atol=1e-6)
  assert set(v["params"]) == {"mlp_0", "mlp_1"}


# --- re-ID network ------------------------------------------------------------------------------------------

def test_reid_train_and_eval_outputs(reid_vars):
  model = ReIDNet(CLASSES, stages=STAGES, width=WIDTH)
  x = normal(7, (4, H // 4, W // 4, 4 * NGF))
  (logits, pooled), updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      reid_vars, x)
  assert logits.shape == (4, CLASSES) and pooled.shape == (4, 32 * WIDTH)
  assert set(reid_vars["params"]) == {"layer2", "layer3", "layer4", "bnneck", "classifier"}
  # torch's running statistics: momentum 0.1, unbiased batch variance.
  old = reid_vars["batch_stats"]["bnneck"]
  np.testing.assert_allclose(updated["batch_stats"]["bnneck"]["mean"],
                             0.9 * old["mean"] + 0.1 * pooled.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updated["batch_stats"]["bnneck"]["var"],
                             0.9 * old["var"] + 0.1 * pooled.var(0, ddof=1), rtol=1e-5)
  # The stride sits on the 3x3 conv of the first bottleneck of each stage, whose shortcut is conv1x1 + BN.
  block = reid_vars["params"]["layer2"]["block_0"]
  assert block["conv1"]["kernel"].shape == (1, 1, 4 * NGF, 2 * WIDTH)
  assert block["downsample_conv"]["kernel"].shape == (1, 1, 4 * NGF, 8 * WIDTH)


def test_bnneck_shift_is_frozen(reid_vars):
  model = ReIDNet(CLASSES, stages=STAGES, width=WIDTH)
  x = normal(8, (4, H // 4, W // 4, 4 * NGF))

  def loss(params):
    (logits, _), _ = model.apply({"params": params, "batch_stats": reid_vars["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
    return jnp.sum(logits ** 2)

  grads = jax.jit(jax.grad(loss))(reid_vars["params"])
  np.testing.assert_array_equal(grads["bnneck"]["bias"], 0.0)
  assert float(jnp.abs(grads["bnneck"]["scale"]).max()) > 0
  assert float(jnp.abs(grads["classifier"]["bias"]).max()) > 0
  mask = frozen_params_mask(reid_vars["params"])
  assert jax.tree.structure(mask) == jax.tree.structure(reid_vars["params"])
  assert [jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m] == \
      ["['bnneck']['bias']"]
  nested = frozen_params_mask({"generator": {"x": jnp.zeros(1)}, "reid": reid_vars["params"]})
  assert nested["reid"]["bnneck"]["bias"] and not nested["generator"]["x"]


def test_reid_bfloat16_keeps_float32_params_and_outputs(reid_vars):
  x = normal(9, (4, H // 4, W // 4, 4 * NGF))
  f32 = ReIDNet(CLASSES, stages=STAGES, width=WIDTH)
  bf16 = ReIDNet(CLASSES, stages=STAGES, width=WIDTH, dtype=jnp.bfloat16)
  neck32, neck16, (_, updated) = jax.jit(lambda v, x: (
      f32.apply(v, x, train=False), bf16.apply(v, x, train=False),
      bf16.apply(v, x, train=True, mutable=["batch_stats"])))(reid_vars, x)
  assert neck16.dtype == jnp.float32
  np.testing.assert_allclose(neck16, neck32, atol=0.05 * float(jnp.abs(neck32).max()))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updated))


def test_resnet_stem_shapes():
  stem = ResNetStem(num_blocks=1, width=WIDTH)
  x = images()
  v = jax.eval_shape(lambda k, x: stem.init(k, x, train=False), jax.random.PRNGKey(0), x)
  assert set(v["params"]) == {"conv1", "bn1", "layer1"}
  out = jax.eval_shape(lambda v, x: stem.apply(v, x, train=True, mutable=["batch_stats"]), v, x)[0]
  assert out.shape == (N, H // 4, W // 4, 4 * WIDTH)


# --- building blocks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pad", [1, 3])
def test_reflect_pad_is_bit_identical_to_jnp_pad(pad):
  x = normal(10, (2, 7, 5, 3))
  want = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  np.testing.assert_array_equal(layers.reflect_pad(x, pad), want)
  g = jax.grad(lambda x: jnp.sum(layers.reflect_pad(x, pad) * want))(x)
  jnp_pad = lambda x: jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  g_want = jax.grad(lambda x: jnp.sum(jnp_pad(x) * want))(x)
  np.testing.assert_allclose(g, g_want, rtol=1e-6)
  with pytest.raises(ValueError, match="spatial size"):
    layers.reflect_pad(x, 5)


def test_conv_transpose_matches_the_dilated_definition():
  x = normal(11, (2, 5, 3, 6))
  k = normal(12, (3, 3, 6, 4))
  y = layers.ConvTranspose3x3s2(4).apply({"params": {"kernel": k}}, x)
  # torch's ConvTranspose2d(3, s=2, p=1, output_padding=1): the input dilated by 2, padded (1, 2) on each
  # spatial axis, correlated with the spatially flipped kernel.
  want = jax.lax.conv_general_dilated(x, k[::-1, ::-1], (1, 1), ((1, 2), (1, 2)), lhs_dilation=(2, 2),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert y.shape == (2, 10, 6, 4)
  np.testing.assert_allclose(y, want, atol=1e-5)


def test_unpadded_conv_matches_valid_convolution():
  x = normal(13, (2, 9, 6, 3))
  for stride in (1, 2):
    k = normal(14, (3, 3, 3, 5))
    conv = layers.Conv(5, 3, stride=stride, use_bias=True)
    got = conv.apply({"params": {"kernel": k, "bias": jnp.ones(5)}}, x)
    want = jax.lax.conv_general_dilated(x, k, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(got, want + 1.0, atol=1e-5)


def test_uneven_padding_conv_matches_padded_convolution():
  x = normal(15, (2, 8, 5, 3))
  k = normal(16, (4, 4, 3, 2))
  padding = ((1, 1), (2, 2))  # the discriminator's penultimate conv
  conv = layers.Conv(2, 4, padding=padding)
  got, got_grads = jax.value_and_grad(lambda k, x: jnp.sum(jnp.sin(conv.apply({"params": {"kernel": k}}, x))),
                                      argnums=(0, 1))(k, x)
  want, want_grads = jax.value_and_grad(lambda k, x: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")))), argnums=(0, 1))(k, x)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("stride,hw", [(1, (6, 5)), (2, (6, 5)), (2, (7, 4))])
def test_pointwise_conv_matches_xla_convolution(stride, hw):
  x = normal(19, (2, *hw, 8))
  k = normal(20, (1, 1, 8, 16))
  xla_conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride, stride), "VALID",
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(layers.pointwise_conv(x, k, stride), xla_conv(x, k), rtol=1e-5, atol=1e-6)
  loss = lambda conv: (lambda x, k: jnp.sum(jnp.sin(conv(x, k))))
  got = jax.grad(loss(lambda x, k: layers.pointwise_conv(x, k, stride)), argnums=(0, 1))(x, k)
  want = jax.grad(loss(xla_conv), argnums=(0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, kernel, stride, pad", [
    ((2, 16, 12, 5), 3, 2, 1),  # the generator's downsampling convs
    ((3, 16, 8, 6), 4, 2, 1),  # the discriminator's
    ((1, 12, 12, 3), 7, 2, 3),  # a ResNet stem
    ((2, 9, 9, 3), 3, 3, 1),
    ((1, 8, 8, 2), 1, 2, 1),  # a kernel narrower than the stride: phases without taps
])
def test_strided_conv_gradients_by_phases_match_autodiff(shape, kernel, stride, pad):
  x = normal(22, shape)
  w = normal(23, (kernel, kernel, shape[-1], 4))
  padding = ((pad, pad), (pad, pad))
  y, want_vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride, padding), x, w)
  y_phases, vjp = jax.vjp(lambda x, w: layers.strided_conv2d(x, w, stride, padding), x, w)
  np.testing.assert_array_equal(y_phases, y)
  dy = normal(24, y.shape)
  for got, want in zip(vjp(dy), want_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_module_takes_the_phase_gradients_for_strided_layers():
  x = normal(25, (2, 16, 8, 6))
  conv = layers.Conv(5, 3, stride=2, padding=1)
  params = conv.init(jax.random.PRNGKey(0), x)
  assert "strided_conv2d" in str(jax.make_jaxpr(conv.apply)(params, x))
  narrow = x[..., :3]  # 3 input channels: autodiff's input gradient
  narrow_params = conv.init(jax.random.PRNGKey(0), narrow)
  assert "strided_conv2d" not in str(jax.make_jaxpr(conv.apply)(narrow_params, narrow))
  loss = lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))
  plain = lambda p, x: jnp.sum(jnp.sin(layers.conv2d(x, p["params"]["kernel"], 2, ((1, 1), (1, 1)))))
  for got, want in zip(jax.grad(loss, argnums=(0, 1))(params, x), jax.grad(plain, argnums=(0, 1))(params, x)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_l2_normalize_values_and_gradients():
  from synth_reid_jax.models import projector
  x = normal(21, (5, 8)).at[2].set(0.0)  # one all-zero row, as a patch with every MLP hidden unit off
  y = projector.l2_normalize(x)
  naive = lambda x: x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + projector.L2_NORM_EPS)
  np.testing.assert_allclose(y, naive(x), rtol=1e-6)
  assert not np.any(y[2])
  loss = lambda f: (lambda x: jnp.sum(jnp.sin(3.0 * f(x))))
  grad = jax.grad(loss(projector.l2_normalize))(x)
  assert np.all(np.isfinite(grad))  # the naive form's sqrt gives NaN here and stops training
  assert np.isnan(jax.grad(loss(naive))(x)[2]).all()
  np.testing.assert_allclose(np.delete(grad, 2, 0), np.delete(jax.grad(loss(naive))(x), 2, 0), rtol=1e-5)


def test_instance_norm_statistics():
  x = 3.0 + 2.0 * normal(15, (2, 8, 6, 4))
  y = layers.instance_norm(x)
  np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 2)), 1.0, rtol=1e-3)  # var / (var + eps)
  assert layers.instance_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_instance_norm_matches_a_float64_reference():
  x = 3.0 + 2.0 * normal(17, (2, 40, 36, 8))  # 1440 pixels: past XLA's 32-wide reduction windows
  xd = np.asarray(x, np.float64)
  want = (xd - xd.mean(axis=(1, 2), keepdims=True)) / np.sqrt(xd.var(axis=(1, 2), keepdims=True) + 1e-5)
  np.testing.assert_allclose(layers.instance_norm(x), want, atol=2e-5)


def test_add_bias_gradient_sums_over_batch_and_pixels():
  y, w = normal(18, (2, 40, 36, 8)), normal(19, (2, 40, 36, 8))
  bias = normal(20, (8,))
  out = layers.add_bias(y, bias)
  np.testing.assert_array_equal(out, y + bias)
  grad = jax.grad(lambda b: jnp.sum(w * layers.add_bias(y, b)))(bias)
  np.testing.assert_allclose(grad, np.asarray(w, np.float64).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(layers.add_bias(y[:, 0, 0], bias), y[:, 0, 0] + bias)  # 2-D: a plain add


def test_batch_norm_on_feature_maps_trains_with_torch_statistics():
  x = 1.5 + 3.0 * normal(21, (3, 20, 12, 4))
  bn = layers.BatchNorm()
  v = bn.init(jax.random.PRNGKey(0), x, train=False)
  y, updated = bn.apply(v, x, train=True, mutable=["batch_stats"])
  xd = np.asarray(x, np.float64)
  mean, var = xd.mean(axis=(0, 1, 2)), xd.var(axis=(0, 1, 2))
  assert y.shape == x.shape
  np.testing.assert_allclose(y, (xd - mean) / np.sqrt(var + 1e-5), atol=1e-4)
  n = xd.size // 4
  np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)


def test_batch_norm_eval_uses_running_statistics():
  bn = layers.BatchNorm()
  x = normal(16, (6, 5))
  v = {"params": {"scale": jnp.full(5, 2.0), "bias": jnp.full(5, 0.5)},
       "batch_stats": {"mean": jnp.full(5, 1.0), "var": jnp.full(5, 4.0)}}
  want = (x - 1.0) / np.sqrt(4.0 + 1e-5) * 2.0 + 0.5
  np.testing.assert_allclose(bn.apply(v, x, train=False), want, atol=1e-6)
  y, _ = bn.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5) * 2.0 + 0.5, rtol=1e-4, atol=1e-5)
