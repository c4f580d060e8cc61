"""The four networks of the method (G, D, F, R) and the ResNet-50 stem of the direct-transfer baselines."""

from typing import NamedTuple

from synth_reid_jax.models.discriminator import Discriminator
from synth_reid_jax.models.forms import CONV_IMPLS, check_conv_impl, conv_forms
from synth_reid_jax.models.generator import Generator
from synth_reid_jax.models.layers import canonical_dtype, resnet_conv_init
from synth_reid_jax.models.projector import Projector, l2_normalize, sample_patch_ids
from synth_reid_jax.models.reid import (
    NECKS,
    ReIDNet,
    ResNetStem,
    frozen_params_mask,
    torchreid_classifier_init,
)

# config.model.backbone: what R reads. "generator": G's encoder (the method). The direct-transfer baselines,
# where a ResNet-50 stem (conv1 .. layer1) replaces G: "resnet50" keeps R's BNNeck head; "resnet50_plain" is
# torchreid's resnet50 as the original's baseline run builds it (no BNNeck, the pooled 2048-d feature at test
# time, torchreid's initialisation).
BASELINE_BACKBONES = ("resnet50", "resnet50_plain")
BACKBONES = ("generator", *BASELINE_BACKBONES)
# R's head and initialisers per backbone (default: the original's Id_Net, BNNeck and weights_init_kaiming).
# torchreid's ResNet._init_params: convs kaiming-normal over fan_out, nn.Linear N(0, 0.01), biases 0.
REID_HEADS = {"resnet50_plain": dict(neck="none", kernel_init=resnet_conv_init,
                                     classifier_init=torchreid_classifier_init)}

__all__ = [
    "BACKBONES", "BASELINE_BACKBONES", "CONV_IMPLS", "NECKS", "Discriminator", "Generator", "Models",
    "Projector", "ReIDNet", "ResNetStem", "build_models", "conv_forms", "frozen_params_mask", "l2_normalize",
    "sample_patch_ids",
]


class Models(NamedTuple):
  """The method's networks; `stem` is the ResNet-50 stem that replaces the encoder in the baselines
  (config.model.backbone in BASELINE_BACKBONES), None for the method."""
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
  stem = ResNetStem(width=m.reid_width, **kw) if backbone in BASELINE_BACKBONES else None
  return Models(
      generator=Generator(ngf=m.ngf, n_blocks=m.n_blocks, remat=m.remat, **kw),
      discriminator=Discriminator(ndf=m.ndf, **kw),
      projector=Projector(dim=m.projector_dim, dtype=dtype),
      reid=ReIDNet(num_classes, stages=tuple(m.reid_stages), width=m.reid_width,
                   **REID_HEADS.get(backbone, {}), **kw),
      stem=stem,
  )
