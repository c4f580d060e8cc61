"""The four networks of the method (G, D, F, R) and the ResNet-50 stem of the direct-transfer baseline."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from synth_reid_jax.models.discriminator import Discriminator
from synth_reid_jax.models.generator import Generator
from synth_reid_jax.models.layers import canonical_dtype
from synth_reid_jax.models.projector import Projector, l2_normalize, sample_patch_ids
from synth_reid_jax.models.reid import ReIDNet, ResNetStem, frozen_params_mask

BACKBONES = ("generator", "resnet50")

__all__ = [
    "BACKBONES", "Discriminator", "Generator", "Models", "Projector", "ReIDNet", "ResNetStem", "build_models",
    "frozen_params_mask", "generator_saved_bytes", "l2_normalize", "sample_patch_ids",
]


class Models(NamedTuple):
  """The method's networks; `stem` is the ResNet-50 stem that replaces the encoder for backbone="resnet50"."""
  generator: Generator
  discriminator: Discriminator
  projector: Projector
  reid: ReIDNet
  stem: ResNetStem | None = None


def build_models(config, num_classes: int) -> Models:
  """Builds the networks from config.model.{ngf, n_blocks, ndf, projector_dim, reid_stages, reid_width, dtype,
  remat, backbone}; `num_classes` = source identities for the re-ID classifier."""
  m = config.model
  dtype = canonical_dtype(m.dtype)
  backbone = m.get("backbone", "generator")
  if backbone not in BACKBONES:
    raise ValueError(f"config.model.backbone={backbone!r} is unknown; use one of {BACKBONES}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  stem = ResNetStem(width=m.reid_width, dtype=dtype) if backbone == "resnet50" else None
  return Models(
      generator=Generator(ngf=m.ngf, n_blocks=m.n_blocks, dtype=dtype, remat=m.remat),
      discriminator=Discriminator(ndf=m.ndf, dtype=dtype),
      projector=Projector(dim=m.projector_dim, dtype=dtype),
      reid=ReIDNet(num_classes, stages=tuple(m.reid_stages), width=m.reid_width, dtype=dtype),
      stem=stem,
  )


def generator_saved_bytes(config, batch_size: int) -> int:
  """Bytes of the activations G's forward keeps for its backward pass (the residuals of jax.vjp), counted
  from shapes alone: what the bf16 path and remat change, on any backend. (XLA:CPU's buffer assignment does
  not reflect rematerialisation, so its peak is not the number to read for them.)"""
  generator = build_models(config, 1).generator
  size = (config.data.height, config.data.width, 3)
  params = jax.eval_shape(lambda: generator.init(jax.random.key(0), jnp.zeros((1, *size)))["params"])
  images = jax.ShapeDtypeStruct((batch_size, *size), jnp.float32)
  vjp_fn = jax.eval_shape(lambda p, x: jax.vjp(lambda p, x: generator.apply({"params": p}, x), p, x)[1],
                          params, images)
  return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp_fn)))
