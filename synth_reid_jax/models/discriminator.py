"""The PatchGAN discriminator D: real/fake scores per image patch; its features drive feature matching."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_reid_jax.models.layers import Dtype, conv, instance_norm

LEAKY_SLOPE = 0.2
KERNEL = 4
NUM_LAYERS = 6  # the original's nn.Sequential indices 0..5
# The last two convs are stride 1 with asymmetric (H, W) zero paddings chosen by the original so that a
# 256x128 input gives a 32x16 map: 32x16 -> 31x17 -> 32x16.
PAD_PENULTIMATE = ((1, 1), (2, 2))
PAD_LAST = ((2, 2), (1, 1))


class Discriminator(nn.Module):
  """D: image (N,H,W,3) -> score map (N,H/8,W/8,1) float32, or the features at the requested layers.

  Layers as the original: 0 conv4 s2 (with bias, before its LeakyReLU), 1 its LeakyReLU, 2-3 conv4 s2 + IN +
  LeakyReLU, 4 conv4 s1 + IN + LeakyReLU, 5 the output conv. Features are in the compute dtype.
  """
  ndf: int = 64
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"  # forms.CONV_IMPLS

  def setup(self):
    kw = dict(dtype=self.dtype, conv_impl=self.conv_impl)
    self.conv_0 = conv(self.ndf, KERNEL, stride=2, padding=1, use_bias=True, **kw)
    self.conv_1 = conv(self.ndf * 2, KERNEL, stride=2, padding=1, **kw)
    self.conv_2 = conv(self.ndf * 4, KERNEL, stride=2, padding=1, **kw)
    self.conv_3 = conv(self.ndf * 8, KERNEL, padding=PAD_PENULTIMATE, **kw)
    self.conv_4 = conv(1, KERNEL, padding=PAD_LAST, use_bias=True, **kw)

  def _layers(self):
    """The network as a list of callables, index = the original's layer number."""
    act = lambda x: nn.leaky_relu(x, LEAKY_SLOPE)
    conv_in_act = lambda layer: (lambda x: act(instance_norm(layer(x))))
    return [self.conv_0, act, conv_in_act(self.conv_1), conv_in_act(self.conv_2), conv_in_act(self.conv_3),
            self.conv_4]

  def __call__(self, x: jax.Array, layers: Sequence[int] = ()):
    """layers=() -> score map; layers -> [feature at each layer] (in that order), stopping after the last."""
    wanted = tuple(layers)
    bad = [layer for layer in wanted if not 0 <= layer < NUM_LAYERS]
    if bad:
      raise ValueError(f"discriminator layers {bad} out of range; valid are 0..{NUM_LAYERS - 1}")
    last = max(wanted) if wanted else NUM_LAYERS - 1
    feats = {}
    h = x.astype(self.dtype)
    for index, layer in enumerate(self._layers()[:last + 1]):
      h = layer(h)
      if index in wanted:
        feats[index] = h.astype(jnp.float32) if index == NUM_LAYERS - 1 else h
    if not wanted:
      return h.astype(jnp.float32)
    return [feats[layer] for layer in wanted]
