"""The re-ID network R: ResNet-50 stages 2-4 on the generator's encoder features, global pooling and BNNeck.

Also the ResNet-50 stem (conv1 .. stage 1) for the direct-transfer baselines, which replaces the encoder, and
the head of torchreid's plain `resnet50` (no BNNeck; the pooled feature at test time).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_reid_jax.models.layers import (
    BatchNorm,
    Dtype,
    Initializer,
    bnneck_scale_init,
    conv,
    conv_init,
    dense,
    dense_init,
    resnet_conv_init,
)

EXPANSION = 4  # Bottleneck output channels = planes * 4
STAGE_STRIDE = 2  # every stage 2-4 halves H and W (the original's last_stride: 2, no last-stride trick)
BNNECK = "bnneck"
# ReIDNet.neck: the original's Id_Net has a BNNeck between the pooled feature and the classifier; torchreid's
# plain resnet50 (the direct-transfer baseline) classifies the pooled feature and returns it at test time.
NECKS = (BNNECK, "none")
# torchreid's ResNet._init_params draws nn.Linear weights from N(0, 0.01), biases 0.
TORCHREID_LINEAR_STD = 0.01
torchreid_classifier_init = nn.initializers.normal(TORCHREID_LINEAR_STD)


class Bottleneck(nn.Module):
  """torchvision's ResNet bottleneck (v1.5: the stride sits on the 3x3 conv); conv1x1 + BN shortcut."""
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = conv_init
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, kernel_init=self.kernel_init, conv_impl=self.conv_impl)
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)
    out_channels = self.planes * EXPANSION
    y = nn.relu(bn("bn1")(conv(self.planes, 1, name="conv1", **kw)(x), train))
    y = nn.relu(bn("bn2")(conv(self.planes, 3, stride=self.stride, padding=1, name="conv2", **kw)(y), train))
    y = bn("bn3")(conv(out_channels, 1, name="conv3", **kw)(y), train)
    if self.stride != 1 or x.shape[-1] != out_channels:
      x = conv(out_channels, 1, stride=self.stride, name="downsample_conv", **kw)(x)
      x = bn("downsample_bn")(x, train)
    return nn.relu(x + y)


class ResNetStage(nn.Module):
  """`num_blocks` bottlenecks; the first one strides and projects the shortcut."""
  planes: int
  num_blocks: int
  stride: int
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = conv_init
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      stride = self.stride if i == 0 else 1
      x = Bottleneck(self.planes, stride, dtype=self.dtype, kernel_init=self.kernel_init,
                     conv_impl=self.conv_impl, name=f"block_{i}")(x, train)
    return x


class ReIDNet(nn.Module):
  """R: encoder features (N,h,w,C) -> train: (logits, pooled feature); eval: the test feature (N, D).

  Stages 2-4 have 2, 4, 8 x width planes (x4 output channels); outputs are float32. neck="bnneck" (the
  original's Id_Net): the classifier reads the BNNeck output, which is also the test feature; neck="none"
  (torchreid's resnet50): the classifier reads the pooled feature, which is the test feature. The triplet
  loss reads the pooled feature either way. The initialisers default to the original's weights_init_kaiming.
  """
  num_classes: int
  stages: Sequence[int] = (4, 6, 3)
  width: int = 64
  neck: str = BNNECK
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"
  kernel_init: Initializer = conv_init
  classifier_init: Initializer = dense_init

  @property
  def feature_dim(self) -> int:
    return self.width * 2 ** len(self.stages) * EXPANSION

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    if self.neck not in NECKS:
      raise ValueError(f"ReIDNet.neck={self.neck!r}; use one of {NECKS}")
    x = x.astype(self.dtype)
    for i, num_blocks in enumerate(self.stages):
      x = ResNetStage(self.width * 2 ** (i + 1), num_blocks, STAGE_STRIDE, dtype=self.dtype,
                      kernel_init=self.kernel_init, conv_impl=self.conv_impl, name=f"layer{i + 2}")(x, train)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (N, feature_dim)
    feature = pooled
    if self.neck == BNNECK:
      # The original freezes the BNNeck's shift (bias.requires_grad = False) but keeps the parameter.
      bnneck = BatchNorm(scale_init=bnneck_scale_init, freeze_bias=True, dtype=jnp.float32, name=BNNECK)
      feature = bnneck(pooled, train)
    classifier = dense(self.num_classes, dtype=jnp.float32, kernel_init=self.classifier_init,
                       name="classifier")
    if not train:
      if self.is_initializing():
        classifier(feature)  # so that an eval-mode init creates every parameter
      return feature
    return classifier(feature), pooled


class ResNetStem(nn.Module):
  """ResNet-50 conv1 7x7 s2 + BN + ReLU + maxpool 3x3 s2 + stage 1: (N,H,W,3) -> (N,H/4,W/4,4*width).

  The direct-transfer baseline's encoder (same output shape as the generator's encoder). Convs are initialised
  over fan_out as torchvision's ResNet; in practice it is loaded from ImageNet weights.
  """
  num_blocks: int = 3
  width: int = 64
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    x = conv(self.width, 7, stride=2, padding=3, dtype=self.dtype, kernel_init=resnet_conv_init,
             conv_impl=self.conv_impl, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return ResNetStage(self.width, self.num_blocks, 1, dtype=self.dtype, kernel_init=resnet_conv_init,
                       conv_impl=self.conv_impl, name="layer1")(x, train)


def frozen_params_mask(params):
  """Pytree of bools matching `params`, True for parameters that must never change (the BNNeck shift; none
  without a BNNeck).

  Works on the re-ID params or any tree containing them, e.g. for
  `optax.chain(adam, optax.masked(optax.set_to_zero(), frozen_params_mask(params)))`.
  """
  def is_frozen(path, _):
    keys = [getattr(entry, "key", None) for entry in path]
    return len(keys) >= 2 and keys[-2] == BNNECK and keys[-1] == "bias"
  return jax.tree_util.tree_map_with_path(is_frozen, params)
