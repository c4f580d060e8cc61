"""The translation generator G: a CUT-style ResNet encoder-decoder whose encoder layers feed PatchNCE."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_reid_jax.models.layers import (
    ConvTranspose3x3s2,
    Dtype,
    conv,
    instance_norm,
    reflect_pad,
)

OUTER_PAD = 3  # reflect padding around the 7x7 input and output convolutions
NUM_DOWNSAMPLINGS = 2
FIRST_BLOCK_LAYER = 1 + 1 + NUM_DOWNSAMPLINGS  # encoder layer index of the first residual block (4)


class ResidualBlock(nn.Module):
  """x + IN(conv3(pad(ReLU(IN(conv3(pad(x))))))); the second conv keeps its bias, as the original."""
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, conv_impl=self.conv_impl)
    y = conv(c, 3, name="conv_0", **kw)(reflect_pad(x, 1))
    y = nn.relu(instance_norm(y))
    y = conv(c, 3, use_bias=True, name="conv_1", **kw)(reflect_pad(y, 1))
    return x + instance_norm(y)


class Generator(nn.Module):
  """G: x (N,H,W,3) in [-1, 1] -> image (N,H,W,3), and the encoder features at the requested layers.

  Encoder layers are numbered as the original's nn.Sequential: 0 the reflect-padded input (N,H+6,W+6,3),
  1 conv7, 2-3 the strided convs, 4 .. 3+n_blocks the residual blocks; the last is the encoder output
  (N,H/4,W/4,4*ngf) that the re-ID network reads. The image is float32; features are in the compute dtype.
  Initialise with a full call (not encode_only), which creates every parameter.
  """
  ngf: int = 64
  n_blocks: int = 9
  dtype: Dtype = jnp.float32
  remat: bool = False  # rematerialise each residual block in the backward pass
  conv_impl: str = "auto"  # forms.CONV_IMPLS

  def setup(self):
    conv_kw = dict(dtype=self.dtype, conv_impl=self.conv_impl)
    self.conv_in = conv(self.ngf, 7, **conv_kw)
    self.down = [conv(self.ngf * 2 ** (i + 1), 3, stride=2, padding=1, **conv_kw)
                 for i in range(NUM_DOWNSAMPLINGS)]
    block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    self.block = [block(**conv_kw) for _ in range(self.n_blocks)]
    self.up = [ConvTranspose3x3s2(self.ngf * 2 ** (NUM_DOWNSAMPLINGS - 1 - i), **conv_kw)
               for i in range(NUM_DOWNSAMPLINGS)]
    self.conv_out = conv(3, 7, use_bias=True, **conv_kw)

  @property
  def num_encoder_layers(self) -> int:
    return FIRST_BLOCK_LAYER + self.n_blocks

  def _encoder_layers(self):
    """The encoder as a list of callables, index = the original's layer number."""
    conv_in_relu = lambda layer: (lambda x: nn.relu(instance_norm(layer(x))))
    return ([lambda x: reflect_pad(x, OUTER_PAD), conv_in_relu(self.conv_in)]
            + [conv_in_relu(layer) for layer in self.down] + list(self.block))

  def encode(self, x: jax.Array, layers: Sequence[int] = (), stop_early: bool = False):
    """Runs the encoder; returns (encoder output or None if stopped early, [feature at each of `layers`])."""
    wanted = tuple(layers)
    bad = [layer for layer in wanted if not 0 <= layer < self.num_encoder_layers]
    if bad:
      raise ValueError(f"encoder layers {bad} out of range; valid are 0..{self.num_encoder_layers - 1}")
    last = max(wanted) if stop_early else self.num_encoder_layers - 1
    feats = {}
    h = x.astype(self.dtype)
    for index, layer in enumerate(self._encoder_layers()[:last + 1]):
      h = layer(h)
      if index in wanted:
        feats[index] = h
    out = h if last == self.num_encoder_layers - 1 else None
    return out, [feats[layer] for layer in wanted]

  def decode(self, h: jax.Array) -> jax.Array:
    """Encoder output (N,H/4,W/4,4*ngf) -> image (N,H,W,3) in [-1, 1], float32."""
    for layer in self.up:
      h = nn.relu(instance_norm(layer(h)))
    h = self.conv_out(reflect_pad(h, OUTER_PAD))
    return jnp.tanh(h.astype(jnp.float32))

  def __call__(self, x: jax.Array, layers: Sequence[int] = (), encode_only: bool = False):
    """layers=() -> image; layers -> (image, feats); encode_only -> feats, stopping after max(layers).

    Features come in the order of `layers`.
    """
    if encode_only:
      if not layers:
        raise ValueError("encode_only=True needs the encoder layers to return, e.g. layers=(0, 2, 3, 4, 8)")
      return self.encode(x, layers, stop_early=True)[1]
    h, feats = self.encode(x, layers)
    image = self.decode(h)
    return (image, feats) if layers else image

  def encoder_output(self, x: jax.Array) -> jax.Array:
    """The encoder's last features (N,H/4,W/4,4*ngf), the input of the re-ID network."""
    return self.encode(x)[0]
