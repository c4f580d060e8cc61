"""The four networks of the method (G, D, F, R) and the ResNet-50 stem of the direct-transfer baseline."""

from typing import NamedTuple

from synth_reid_jax.models.discriminator import Discriminator
from synth_reid_jax.models.forms import CONV_IMPLS, check_conv_impl, conv_forms
from synth_reid_jax.models.generator import Generator
from synth_reid_jax.models.layers import canonical_dtype
from synth_reid_jax.models.projector import Projector, l2_normalize, sample_patch_ids
from synth_reid_jax.models.reid import ReIDNet, ResNetStem, frozen_params_mask

BACKBONES = ("generator", "resnet50")

__all__ = [
    "BACKBONES", "CONV_IMPLS", "Discriminator", "Generator", "Models", "Projector", "ReIDNet", "ResNetStem",
    "build_models", "conv_forms", "frozen_params_mask", "l2_normalize", "sample_patch_ids",
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
  remat, backbone, conv_impl}; `num_classes` = source identities for the re-ID classifier."""
  m = config.model
  dtype = canonical_dtype(m.dtype)
  conv_impl = m.get("conv_impl", "auto")
  check_conv_impl(conv_impl)
  backbone = m.get("backbone", "generator")
  if backbone not in BACKBONES:
    raise ValueError(f"config.model.backbone={backbone!r} is unknown; use one of {BACKBONES}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  kw = dict(dtype=dtype, conv_impl=conv_impl)
  stem = ResNetStem(width=m.reid_width, **kw) if backbone == "resnet50" else None
  return Models(
      generator=Generator(ngf=m.ngf, n_blocks=m.n_blocks, remat=m.remat, **kw),
      discriminator=Discriminator(ndf=m.ndf, **kw),
      projector=Projector(dim=m.projector_dim, dtype=dtype),
      reid=ReIDNet(num_classes, stages=tuple(m.reid_stages), width=m.reid_width, **kw),
      stem=stem,
  )
