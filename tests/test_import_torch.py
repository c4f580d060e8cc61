"""tools.import_torch: checkpoints in the original PyTorch layout give our networks the same outputs.

The torch networks below are small re-statements of the original's layer structure (module nesting decides the
state_dict keys), written from the method's description at tiny widths.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth_reid_jax.models import Discriminator, Generator, Projector, ReIDNet, ResNetStem, sample_patch_ids
from synth_reid_jax.tools import import_torch

torch = pytest.importorskip("torch")
tnn = torch.nn

pytestmark = pytest.mark.torch

NGF, N_BLOCKS, NDF, DIM, WIDTH, STAGES, CLASSES = 4, 2, 4, 8, 4, (2, 1, 1), 5
NCE_LAYERS = (0, 2, 3, 4, 5)
H, W = 32, 16
ATOL = 1e-5


# --- the original's structure, in torch ---------------------------------------------------------------------

def conv_in_act(cin, cout, k, s, p, act):
  return tnn.Sequential(tnn.Conv2d(cin, cout, k, s, p, bias=False), tnn.InstanceNorm2d(cout), act())


class TorchBlock(tnn.Module):

  def __init__(self, c):
    super().__init__()
    self.layers = tnn.Sequential(tnn.ReflectionPad2d(1), conv_in_act(c, c, 3, 1, 0, tnn.ReLU),
                                 tnn.ReflectionPad2d(1), tnn.Conv2d(c, c, 3), tnn.InstanceNorm2d(c))

  def forward(self, x):
    return x + self.layers(x)


class TorchGenerator(tnn.Module):

  def __init__(self, ngf, n_blocks):
    super().__init__()
    self.encoder = tnn.Sequential(
        tnn.ReflectionPad2d(3), conv_in_act(3, ngf, 7, 1, 0, tnn.ReLU),
        conv_in_act(ngf, 2 * ngf, 3, 2, 1, tnn.ReLU), conv_in_act(2 * ngf, 4 * ngf, 3, 2, 1, tnn.ReLU),
        *[TorchBlock(4 * ngf) for _ in range(n_blocks)])
    up = lambda cin, cout: tnn.Sequential(tnn.ConvTranspose2d(cin, cout, 3, 2, 1, 1, bias=False),
                                          tnn.InstanceNorm2d(cout), tnn.ReLU())
    self.decoder = tnn.Sequential(up(4 * ngf, 2 * ngf), up(2 * ngf, ngf), tnn.ReflectionPad2d(3),
                                  tnn.Conv2d(ngf, 3, 7), tnn.Tanh())

  def forward(self, x, layers):
    feats = []
    for i, layer in enumerate(self.encoder):
      x = layer(x)
      if i in layers:
        feats.append(x)
    return self.decoder(x), feats


class TorchDiscriminator(tnn.Module):

  def __init__(self, ndf):
    super().__init__()
    lrelu = lambda: tnn.LeakyReLU(0.2)
    self.dis = tnn.Sequential(
        tnn.Conv2d(3, ndf, 4, 2, 1), lrelu(), conv_in_act(ndf, 2 * ndf, 4, 2, 1, lrelu),
        conv_in_act(2 * ndf, 4 * ndf, 4, 2, 1, lrelu), conv_in_act(4 * ndf, 8 * ndf, 4, 1, (1, 2), lrelu),
        tnn.Conv2d(8 * ndf, 1, 4, 1, (2, 1)))

  def forward(self, x):
    feats = []
    for layer in self.dis:
      x = layer(x)
      feats.append(x)
    return feats


class TorchMLP(tnn.Module):

  def __init__(self, channels, dim):
    super().__init__()
    for i, c in enumerate(channels):
      setattr(self, f"mlp_{i}", tnn.Sequential(tnn.Linear(c, dim), tnn.ReLU(), tnn.Linear(dim, dim)))


class TorchBottleneck(tnn.Module):

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 conv
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = tnn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(4 * planes)
    self.downsample = None
    if stride != 1 or cin != 4 * planes:
      self.downsample = tnn.Sequential(tnn.Conv2d(cin, 4 * planes, 1, stride, bias=False),
                                       tnn.BatchNorm2d(4 * planes))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def torch_stage(cin, planes, blocks, stride):
  return tnn.Sequential(*[TorchBottleneck(cin if i == 0 else 4 * planes, planes, stride if i == 0 else 1)
                          for i in range(blocks)])


class TorchIdNet(tnn.Module):

  def __init__(self, cin, width, stages, classes):
    super().__init__()
    for i, blocks in enumerate(stages):
      setattr(self, f"layer{i + 2}", torch_stage(cin, width * 2 ** (i + 1), blocks, 2))
      cin = width * 2 ** (i + 1) * 4
    self.bnneck = tnn.BatchNorm1d(cin)
    self.bnneck.bias.requires_grad_(False)
    self.classifier = tnn.Linear(cin, classes)

  def forward(self, x):
    x = self.layer4(self.layer3(self.layer2(x)))
    pooled = x.mean(dim=(2, 3))
    neck = self.bnneck(pooled)
    return neck if not self.training else (self.classifier(neck), pooled)


class TorchResNet50(tnn.Module):
  """torchvision's ResNet-50 key layout (conv1, bn1, layer1-4, fc) at a tiny width."""

  def __init__(self, width, stages):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    cin = width
    for i, blocks in enumerate(stages):
      setattr(self, f"layer{i + 1}", torch_stage(cin, width * 2 ** i, blocks, 1 if i == 0 else 2))
      cin = width * 2 ** i * 4
    self.fc = tnn.Linear(cin, 10)

  def stem(self, x):
    return self.layer1(self.maxpool(torch.relu(self.bn1(self.conv1(x)))))


def randomize_bn_stats(module, seed):
  gen = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, tnn.modules.batchnorm._BatchNorm):
      m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
      m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
      m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
      m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
  return module


# --- helpers ------------------------------------------------------------------------------------------------

def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def images(n=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, H, W, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_nets():
  torch.manual_seed(0)
  nets = {
      "generator": TorchGenerator(NGF, N_BLOCKS),
      "discriminator": TorchDiscriminator(NDF),
      "id_net": randomize_bn_stats(TorchIdNet(4 * NGF, WIDTH, STAGES, CLASSES), 1),
      "mlp": TorchMLP([3, 2 * NGF, 4 * NGF, 4 * NGF, 4 * NGF], DIM),
  }
  return {k: v.eval() for k, v in nets.items()}


@pytest.fixture(scope="module")
def variables(torch_nets):
  return import_torch.convert_state_dicts({k: v.state_dict() for k, v in torch_nets.items()})


def save_original_run(log_dir, nets, epochs=(3,)):
  """Writes checkpoints as the original's save_checkpoint does (DataParallel keys, optimizer, scheduler)."""
  for name, net in nets.items():
    folder = os.path.join(log_dir, name)
    os.makedirs(folder, exist_ok=True)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=2e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [40], gamma=0.1)
    state_dict = {"module." + k: v for k, v in net.state_dict().items()}
    for epoch in epochs:
      torch.save({"state_dict": state_dict, "epoch": epoch, "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict()}, os.path.join(folder, f"model.pth.tar-{epoch}"))


def zeros_like_init(model, x):
  """Zero variables of the right shapes, without the cost of running the initialisers."""
  shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.PRNGKey(0), x)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# --- parity -------------------------------------------------------------------------------------------------

def test_generator_matches_torch(torch_nets, variables):
  x = images()
  with torch.no_grad():
    want_image, want_feats = torch_nets["generator"](nchw(x), NCE_LAYERS)
  model = Generator(ngf=NGF, n_blocks=N_BLOCKS)
  v = {"params": variables["params"]["generator"]}
  image, feats = jax.jit(lambda v, x: model.apply(v, x, layers=NCE_LAYERS))(v, x)
  np.testing.assert_allclose(image, nhwc(want_image), atol=ATOL)
  assert len(feats) == len(NCE_LAYERS)
  for got, want in zip(feats, want_feats):
    np.testing.assert_allclose(got, nhwc(want), atol=ATOL)
  early = jax.jit(lambda v, x: model.apply(v, x, layers=NCE_LAYERS, encode_only=True))(v, x)
  for got, want in zip(early, want_feats):
    np.testing.assert_allclose(got, nhwc(want), atol=ATOL)


def test_discriminator_matches_torch(torch_nets, variables):
  x = images(seed=1)
  with torch.no_grad():
    want = torch_nets["discriminator"](nchw(x))
  model = Discriminator(ndf=NDF)
  v = {"params": variables["params"]["discriminator"]}
  feats, out = jax.jit(lambda v, x: (model.apply(v, x, layers=tuple(range(6))), model.apply(v, x)))(v, x)
  for got, w in zip(feats, want):
    np.testing.assert_allclose(got, nhwc(w), atol=ATOL)
  np.testing.assert_allclose(out, nhwc(want[-1]), atol=ATOL)


def test_projector_matches_torch(torch_nets, variables):
  with torch.no_grad():
    _, feats = torch_nets["generator"](nchw(images(seed=2)), NCE_LAYERS)
  feats = [nhwc(f) for f in feats]
  ids = sample_patch_ids(jax.random.PRNGKey(0), feats, 16)
  got = jax.jit(Projector(dim=DIM).apply)({"params": variables["params"]["projector"]}, feats, ids)
  for i, (f, pid, g) in enumerate(zip(feats, ids, got)):
    sampled = f.reshape(f.shape[0], -1, f.shape[-1])[:, np.asarray(pid)].reshape(-1, f.shape[-1])
    sampled = torch.from_numpy(np.ascontiguousarray(sampled))
    with torch.no_grad():
      y = getattr(torch_nets["mlp"], f"mlp_{i}")(sampled)
      y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-7)
    np.testing.assert_allclose(g, y.numpy(), atol=ATOL)


def test_reid_matches_torch_eval_and_train(torch_nets, variables):
  x = np.random.default_rng(3).normal(size=(8, 16, 8, 4 * NGF)).astype(np.float32)
  net = torch_nets["id_net"]
  model = ReIDNet(CLASSES, stages=STAGES, width=WIDTH)
  v = {"params": variables["params"]["reid"], "batch_stats": variables["batch_stats"]["reid"]}
  with torch.no_grad():
    want = net(nchw(x)).numpy()
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
  assert np.abs(want).max() > 0.1  # the running statistics are not the identity
  np.testing.assert_allclose(got, want, atol=ATOL)

  # Train mode: batch statistics, and torch's running-stat update (unbiased variance, momentum 0.1).
  net_train = TorchIdNet(4 * NGF, WIDTH, STAGES, CLASSES)
  net_train.load_state_dict(net.state_dict())
  net_train.train()
  with torch.no_grad():
    want_logits, want_pooled = net_train(nchw(x))
  train_step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  (logits, pooled), updated = train_step(v, x)
  np.testing.assert_allclose(logits, want_logits.numpy(), atol=ATOL)
  np.testing.assert_allclose(pooled, want_pooled.numpy(), atol=ATOL)
  want_stats = import_torch.convert_state_dicts({"id_net": net_train.state_dict()})["batch_stats"]["reid"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-5),
               updated["batch_stats"], want_stats)


def test_resnet50_conversion_matches_torch(tmp_path):
  torch.manual_seed(1)
  stages = (1, 2, 1, 1)
  net = randomize_bn_stats(TorchResNet50(WIDTH, stages), 2).eval()
  path = tmp_path / "resnet50.pth"
  torch.save(net.state_dict(), path)
  out = tmp_path / "weights" / "resnet50.npz"
  import_torch.main([f"--resnet50={path}", f"--output={out}"])
  pretrained = import_torch.load_npz(out)
  assert set(pretrained) == {"stem", "reid"}

  x = images(seed=4)
  stem = ResNetStem(num_blocks=stages[0], width=WIDTH)
  stem_vars = import_torch.apply_pretrained({"stem": zeros_like_init(stem, x)}, out)["stem"]
  feats = jax.jit(lambda v, x: stem.apply(v, x, train=False))(stem_vars, x)
  with torch.no_grad():
    want_stem = net.stem(nchw(x))
    want_stages = net.layer4(net.layer3(net.layer2(want_stem)))
  np.testing.assert_allclose(feats, nhwc(want_stem), atol=ATOL)

  reid = ReIDNet(CLASSES, stages=stages[1:], width=WIDTH)
  reid_vars = import_torch.merge_pretrained(zeros_like_init(reid, feats), pretrained["reid"])
  reid_vars["params"]["bnneck"]["scale"] = jnp.ones_like(reid_vars["params"]["bnneck"]["scale"])
  reid_vars["batch_stats"]["bnneck"]["var"] = jnp.ones_like(reid_vars["batch_stats"]["bnneck"]["var"])
  # The BNNeck at mean 0, var 1, scale 1, shift 0: neck = pooled / sqrt(1 + eps).
  neck = jax.jit(lambda v, x: reid.apply(v, x, train=False))(reid_vars, feats)
  pooled_want = want_stages.mean(dim=(2, 3)).numpy()
  np.testing.assert_allclose(neck, pooled_want / np.sqrt(1 + 1e-5), atol=ATOL)
  wider = zeros_like_init(ReIDNet(CLASSES, stages=stages[1:], width=2 * WIDTH), feats)
  with pytest.raises(ValueError, match=r"reid/params/layer2/block_0/conv1/kernel' has shape"):
    import_torch.merge_pretrained({"reid": wider}, {"reid": pretrained["reid"]})


def test_plain_resnet50_matches_torchreids_resnet50(tmp_path):
  """backbone="resnet50_plain" with the converted weights and torch's fc as the classifier computes what
  torchreid's resnet50 does: logits of the pooled feature in training, the pooled feature at test time."""
  torch.manual_seed(2)
  stages = (3, 1, 1, 1)  # ResNetStem has layer1's three blocks
  net = randomize_bn_stats(TorchResNet50(WIDTH, stages), 3).eval()
  import_torch.save_npz(tmp_path / "r.npz", import_torch.convert_resnet50(net.state_dict()))
  x = images(n=4, seed=5)
  stem, reid = ResNetStem(width=WIDTH), ReIDNet(10, stages=stages[1:], width=WIDTH, neck="none")
  variables = {"stem": zeros_like_init(stem, x)}
  variables["reid"] = zeros_like_init(reid, jax.eval_shape(lambda v, x: stem.apply(v, x, train=False),
                                                           variables["stem"], x))
  variables = import_torch.apply_pretrained(variables, tmp_path / "r.npz")
  variables["reid"]["params"]["classifier"] = {"kernel": net.fc.weight.detach().numpy().T,
                                               "bias": net.fc.bias.detach().numpy()}

  def forward(v, x, train):
    feats = stem.apply(v["stem"], x, train=train, mutable=["batch_stats"] if train else False)
    feats = feats[0] if train else feats
    out = reid.apply(v["reid"], feats, train=train, mutable=["batch_stats"] if train else False)
    return out[0] if train else out

  def torch_forward(net, x):
    pooled = net.layer4(net.layer3(net.layer2(net.stem(nchw(x))))).mean(dim=(2, 3))
    return net.fc(pooled), pooled

  with torch.no_grad():
    _, want_feature = torch_forward(net, x)
    net.train()
    want_logits, want_pooled = torch_forward(net, x)
  feature = jax.jit(lambda v, x: forward(v, x, False))(variables, x)
  logits, pooled = jax.jit(lambda v, x: forward(v, x, True))(variables, x)
  # Five blocks deeper than the other parity tests: float32 rounding reaches ~1e-4 on values ~2.
  for got, want in ((feature, want_feature), (pooled, want_pooled), (logits, want_logits)):
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


# --- files and the command line -----------------------------------------------------------------------------

def test_command_line_writes_a_restorable_checkpoint(tmp_path, torch_nets, variables):
  from synth_reid_jax import checkpointing

  log_dir, workdir = tmp_path / "log", tmp_path / "work"
  save_original_run(log_dir, torch_nets, epochs=(2, 5))
  import_torch.main([f"--log_dir={log_dir}", f"--workdir={workdir}"])
  ckpt = checkpointing.Checkpointer(workdir, async_save=False, iterator_names=())
  assert ckpt.steps() == [5]  # the latest epoch; the step is the epoch
  metadata = ckpt.metadata()
  assert metadata["num_classes"] == CLASSES and metadata["epoch"] == 5
  assert metadata["config"]["model"] == {"ngf": NGF, "n_blocks": N_BLOCKS, "ndf": NDF, "projector_dim": DIM,
                                         "reid_width": WIDTH, "reid_stages": list(STAGES)}
  template = jax.tree.map(jnp.zeros_like, variables)
  restored, _ = ckpt.restore_variables(template)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  json.dumps(metadata)


def test_latest_common_epoch_and_optional_mlp(tmp_path, torch_nets):
  nets = dict(torch_nets)
  mlp = nets.pop("mlp")
  save_original_run(tmp_path, nets, epochs=(4,))
  save_original_run(tmp_path, {"generator": nets["generator"]}, epochs=(6,))  # only G has epoch 6
  save_original_run(tmp_path, {"mlp": mlp}, epochs=(2,))
  epoch, paths = import_torch.find_checkpoints(tmp_path)
  assert epoch == 4 and set(paths) == {"generator", "discriminator", "id_net"}
  with pytest.raises(FileNotFoundError, match=r"discriminator/model\.pth\.tar-6"):
    import_torch.find_checkpoints(tmp_path, epoch=6)


def test_missing_folder_names_the_path(tmp_path, torch_nets):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    import_torch.find_checkpoints(tmp_path / "nope")
  save_original_run(tmp_path, {"generator": torch_nets["generator"]})
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "discriminator")):
    import_torch.find_checkpoints(tmp_path)


def test_shape_mismatch_names_key_and_shapes(torch_nets):
  sd = dict(torch_nets["generator"].state_dict())
  sd["encoder.5.layers.3.bias"] = torch.zeros(7)
  with pytest.raises(ValueError, match=r"encoder\.5\.layers\.3\.bias.*\(7,\).*block_1/conv_1/bias.*\(16,\)"):
    import_torch.convert_state_dicts({"generator": sd})


def test_unknown_keys_are_an_error(torch_nets):
  sd = dict(torch_nets["discriminator"].state_dict())
  sd["dis.3.gamma"] = torch.zeros(1)  # e.g. the original's optional self-attention
  with pytest.raises(ValueError, match=r"dis\.3\.gamma"):
    import_torch.convert_state_dicts({"discriminator": sd})
