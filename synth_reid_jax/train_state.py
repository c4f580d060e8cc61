"""The train state (params, BatchNorm statistics and optimizer states of every network) and its creation."""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from synth_reid_jax import optim
from synth_reid_jax.models import Models, build_models, frozen_params_mask
from synth_reid_jax.tools import import_torch

# Which optimizer block (config.optim.<name>) trains each network. The baseline's ResNet-50 stem is part of
# the re-ID network there (torchreid trains the whole ResNet-50 with one optimizer).
OPTIMIZER_CONFIG = {"generator": "generator", "discriminator": "discriminator", "projector": "projector",
                    "reid": "reid", "stem": "reid"}
# Networks holding BatchNorm statistics.
BATCH_NORM_MODELS = ("reid", "stem")
RBG_KEY_WORDS = 4  # an "rbg" PRNG key is four uint32 words


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes, replicated on every device.

  params / opt_state: {"generator", "discriminator", "projector", "reid"} for the method, {"stem", "reid"} for
  the ResNet-50 baselines; batch_stats: {"reid"} (+ "stem"). `step` counts train steps (epoch = step // steps
  per epoch).
  """
  step: jax.Array
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  opt_state: dict[str, Any]


def _init_variables(config, models: Models, rng):
  """Initial variables of every network, for a single image of the configured size."""
  image = jnp.zeros((1, config.data.height, config.data.width, 3), jnp.float32)
  # The initialisers draw from an "rbg" key seeded by `rng`: one RngBitGenerator op per tensor compiles
  # several times faster on CPU than threefry's unrolled rounds for the ~100 parameter tensors.
  init_key = jax.random.wrap_key_data(jax.random.bits(rng, (RBG_KEY_WORDS,), jnp.uint32), impl="rbg")
  rngs = dict(zip(("generator", "discriminator", "projector", "reid", "stem"), jax.random.split(init_key, 5)))
  variables = {}
  if models.stem is not None:  # a baseline: a ResNet-50 stem replaces G
    variables["stem"] = models.stem.init(rngs["stem"], image, train=False)
    reid_input = jax.eval_shape(lambda v, x: models.stem.apply(v, x, train=False), variables["stem"], image)
  else:
    variables["generator"] = models.generator.init(rngs["generator"], image)
    variables["discriminator"] = models.discriminator.init(rngs["discriminator"], image)
    nce_feats = jax.eval_shape(lambda v, x: models.generator.apply(
        v, x, layers=tuple(config.loss.nce_layers), encode_only=True), variables["generator"], image)
    # The projector's MLPs only depend on the channel counts: initialise them on one position per map.
    variables["projector"] = models.projector.init(
        rngs["projector"], [jnp.zeros((1, 1, 1, f.shape[-1]), f.dtype) for f in nce_feats])
    reid_input = jax.eval_shape(lambda v, x: models.generator.apply(v, x, method="encoder_output"),
                                variables["generator"], image)
  reid_input = jnp.zeros(reid_input.shape, reid_input.dtype)
  variables["reid"] = models.reid.init(rngs["reid"], reid_input, train=False)
  return variables


def create_optimizers(config, params) -> dict[str, optax.GradientTransformation]:
  """torch-style Adam per network from config.optim; the re-ID network's BNNeck shift is masked out."""
  optimizers = {}
  for name in params:
    frozen = frozen_params_mask if name == "reid" else None
    optimizers[name] = optim.create_optimizer(config.optim[OPTIMIZER_CONFIG[name]], frozen=frozen)
  return optimizers


def _with_pretrained(variables, pretrained):
  """`variables` with the leaves of `pretrained` (import_torch.read_pretrained's numpy trees) replaced.

  The values come in through a host callback when the compiled init runs: as constants of the traced program
  (the trainer compiles create_train_state whole) ImageNet's ~24M values would be embedded in the HLO.
  """
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pretrained)
  values = jax.pure_callback(lambda: pretrained, shapes)
  return {name: import_torch.merge_pretrained(v, values[name]) if name in values else v
          for name, v in variables.items()}


def create_train_state(config, rng, num_classes: int, pretrained: bool = True
                       ) -> tuple[TrainState, dict[str, optax.GradientTransformation]]:
  """Initialises every network for config.data.{height, width} and its optimizer; -> (state, optimizers).

  With config.model.pretrained_reid (an .npz from `import_torch --resnet50`), the baselines' stem and R's
  stages 2-4 start from its ImageNet weights (checked against the configured sizes before anything runs); R's
  BNNeck and classifier keep their initialisation. `pretrained=False` leaves the file unread (for abstract
  states whose values a checkpoint restores).
  """
  if config.data.height % 4 or config.data.width % 4:
    raise ValueError(f"Image size {config.data.height}x{config.data.width} must be a multiple of 4 "
                     "(config.data.height / width).")
  models = build_models(config, num_classes)
  init = functools.partial(_init_variables, config, models)
  weights = config.model.get("pretrained_reid", "") if pretrained else ""
  if weights:
    loaded = import_torch.read_pretrained(jax.eval_shape(init, rng), weights)
    init = lambda key, init=init: _with_pretrained(init(key), loaded)
  variables = jax.jit(init)(rng)
  params = {name: v["params"] for name, v in variables.items()}
  batch_stats = {name: variables[name]["batch_stats"] for name in BATCH_NORM_MODELS if name in variables}
  optimizers = create_optimizers(config, params)
  opt_state = {name: optimizers[name].init(p) for name, p in params.items()}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=opt_state)
  return state, optimizers
