"""The one jit-compiled, data-parallel train step of Synth-ReID.

Per batch of synthetic images s (identities pid) and real images r, the original's updates:
  1. translate s -> G(s); the same encoder pass over s gives the PatchNCE keys and the re-ID input (its last
     layer), as the original's separate passes would (G has no state, so the math is identical);
  2. G's losses: LSGAN on D(G(s)), feature matching between D(r) and D(G(s)), PatchNCE between the encoder
     features of G(s) (queries) and of s (keys, stopped), optional identity PatchNCE on r, and - in the joint
     mode (guide_gen) - the re-ID cross-entropy (+ triplet) of R on the encoder features of s;
  3. D's losses on the stopped translations: LSGAN real/fake and feature matching between D(s) and D(G(s));
  4. one gradient over (G, F, R);
  5. in the disjoint mode, R's losses and gradient on the stopped encoder features;
  6. every network's Adam update.
Steps 2 and 3 both read D with its parameters from before the step (the original updates D after G), on the
same G(s) and r, so one forward pass of D over G(s), r and s serves both: G's backward pass takes the input
gradient on G(s) from it, D's the parameter gradient - the same numbers as two separate passes, 2% fewer
FLOPs. Loss weights of 0 drop their terms (and the networks only they need) when tracing; the runtime
switches live inside the compiled step: the epoch from which the re-ID loss is on (loss.reid_start_epoch,
a select), and the non-finite guard - a step whose losses or gradients hold a NaN or an infinity changes
nothing but the step counter and reports metrics["nonfinite"] = 1, so the state never holds non-finite
values (the trainer decides at its next fetch whether to stop, config.train.on_nonfinite; the guard's form,
a select per array or one lax.cond, is config.train.nonfinite_guard).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from synth_reid_jax import compile_options, losses, optim
from synth_reid_jax.models import BASELINE_BACKBONES, Models, forms, sample_patch_ids
from synth_reid_jax.models.discriminator import NUM_LAYERS as _DISCRIMINATOR_LAYERS
from synth_reid_jax.sharding import batch_sharding, check_batch_size, replicated_sharding
from synth_reid_jax.train_state import OPTIMIZER_CONFIG, TrainState

DIS_SCORE_LAYER = _DISCRIMINATOR_LAYERS - 1  # the PatchGAN's score map is the original's layer 5
LOSS_METRICS = ("gen_gan", "gen_sim", "nce", "nce_idt", "reid_ce", "reid_triplet", "dis_real", "dis_fake",
                "dis_sim")
# config.train.on_nonfinite: what the trainer does once it sees a step skipped by the non-finite guard (the
# step itself always skips the update): stop at that fetch, or carry on.
NONFINITE_ACTIONS = ("stop", "skip")
NONFINITE_METRIC = "nonfinite"
# torchreid reports the top-1 training accuracy in percent.
PERCENT = 100.0


def learning_rate_metric(name: str) -> str:
  return f"lr_{name}"


def _update(optimizer, params, grads, opt_state, learning_rate):
  """One Adam step of one network at this step's learning rate."""
  opt_state = optim.set_learning_rate(opt_state, learning_rate)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _gated(keep_new, new, old):
  """`new` where the scalar bool `keep_new` holds, else `old` (None: always `new`)."""
  if keep_new is None:
    return new
  return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


def all_finite(*trees) -> jax.Array:
  """Whether every float value of the trees is finite (one fused reduction per array)."""
  leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _updated(state: TrainState, optimizers, lrs, grads, new_stats, take_new, take_new_reid):
  """(params, opt_state, batch_stats) after every network with a gradient takes its Adam step and BatchNorm
  statistics their new values, each network only where its flag (`take_new_reid` for R and the stem, else
  `take_new`; None: always) holds, its old values otherwise."""
  params, opt_state = dict(state.params), dict(state.opt_state)
  for name, grad in grads.items():
    updated = _update(optimizers[name], params[name], grad, opt_state[name], lrs[name])
    flag = take_new_reid if name in ("reid", "stem") else take_new
    params[name], opt_state[name] = _gated(flag, updated, (params[name], opt_state[name]))
  batch_stats = {name: _gated(take_new_reid, new_stats[name], old) if name in new_stats else old
                 for name, old in state.batch_stats.items()}
  return params, opt_state, batch_stats


def apply_updates(state: TrainState, optimizers, lrs, grads, new_stats, loss_terms, reid_gate,
                  guard: str = "select"):
  """The step's end: every network with a gradient takes its Adam step, BatchNorm statistics their new
  values, unless a loss or a gradient is non-finite; then nothing changes but the step counter (as optax's
  apply_if_finite, for all networks at once) and the flag returned is 1. R also keeps its state before
  loss.reid_start_epoch (the original neither runs nor updates it then). `guard` is the form of the check
  (forms.nonfinite_guard): "select" chooses every array elementwise, "cond" branches once; the same state
  either way. -> (new state, nonfinite flag)."""
  finite = all_finite(loss_terms, grads)
  reid_on = None if reid_gate is None else reid_gate > 0
  args = (state, optimizers, lrs, grads, new_stats)
  if guard == "cond":
    params, opt_state, batch_stats = jax.lax.cond(
        finite, lambda: _updated(*args, take_new=None, take_new_reid=reid_on),
        lambda: (state.params, state.opt_state, state.batch_stats))
  else:
    reid_finite = finite if reid_on is None else finite & reid_on
    params, opt_state, batch_stats = _updated(*args, take_new=finite, take_new_reid=reid_finite)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return new_state, 1.0 - finite.astype(jnp.float32)


def top1_accuracy(logits, labels):
  """Top-1 accuracy in percent (torchreid's metrics.accuracy)."""
  return PERCENT * jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def reid_losses(models: Models, reid_params, batch_stats, features, pids, loss_config):
  """R in train mode on encoder features: weighted (cross-entropy, triplet), top-1 accuracy, new BN stats.

  BatchNorm statistics are over the whole (global) batch.
  """
  (logits, global_feat), new_vars = models.reid.apply(
      {"params": reid_params, "batch_stats": batch_stats}, features, train=True, mutable=["batch_stats"])
  ce = losses.cross_entropy_loss(logits, pids, loss_config.label_smoothing) * loss_config.reid_ce
  triplet = jnp.zeros((), jnp.float32)
  if loss_config.reid_triplet > 0:
    triplet = losses.triplet_loss(global_feat, pids, loss_config.triplet_margin) * loss_config.reid_triplet
  return ce, triplet, top1_accuracy(logits, pids), new_vars["batch_stats"]


def _reid_gate(config, step, steps_per_epoch):
  """1.0 from the 1-based epoch loss.reid_start_epoch on, else 0.0; None when it is on from the start."""
  if config.loss.reid_start_epoch <= 1:
    return None
  epoch = step // steps_per_epoch  # 0-based, as the original's self.epoch
  return (epoch + 1 >= config.loss.reid_start_epoch).astype(jnp.float32)


def _make_method_step(config, models: Models, optimizers, lr_fns, steps_per_epoch, guard):
  """The Synth-ReID step (G, D, F, R) as a pure function (state, batch, rng) -> (state, metrics)."""
  w = config.loss
  nce_layers = tuple(w.nce_layers)
  dis_layers = tuple(w.dis_layers)
  encoder_output = models.generator.num_encoder_layers - 1  # layer 12: the re-ID network's input
  source_taps = tuple(sorted(set(nce_layers) | {encoder_output}))
  reid_on = w.reid_ce > 0 or w.reid_triplet > 0
  joint = reid_on and w.guide_gen
  disjoint = reid_on and not w.guide_gen
  use_nce = w.nce > 0
  use_idt = use_nce and w.nce_idt > 0  # as the original: identity NCE only alongside PatchNCE
  train_generator = w.gan > 0 or w.sim > 0 or use_nce or joint
  train_discriminator = w.dis > 0 or w.sim > 0

  def generate(g_params, x):
    """(G(x), {layer: encoder feature of x}) for the NCE layers and the encoder output."""
    image, feats = models.generator.apply({"params": g_params}, x, layers=source_taps)
    return image, dict(zip(source_taps, feats))

  def encode(g_params, x):
    """Encoder features of x at the NCE layers (the original's encode_only pass)."""
    return models.generator.apply({"params": g_params}, x, layers=nce_layers, encode_only=True)

  def discriminate(d_params, x, feature_layers, score):
    """(score map or None, [D features at feature_layers])."""
    layers = tuple(feature_layers) + ((DIS_SCORE_LAYER,) if score else ())
    out = models.discriminator.apply({"params": d_params}, x, layers=layers)
    return (out[-1] if score else None), (out[:-1] if score else out)

  def patch_nce(f_params, feats_q, feats_k, rng):
    """PatchNCE averaged over layers: patch positions drawn on the keys, reused for the queries."""
    feats_k = jax.lax.stop_gradient(feats_k)
    patch_ids = sample_patch_ids(rng, feats_k, w.num_patches)
    proj_k = models.projector.apply({"params": f_params}, feats_k, patch_ids)
    proj_q = models.projector.apply({"params": f_params}, feats_q, patch_ids)
    batch_size = feats_q[0].shape[0]
    per_layer = [jnp.mean(losses.patch_nce_loss(q, k, batch_size, w.nce_temperature))
                 for q, k in zip(proj_q, proj_k)]
    return sum(per_layer) / len(per_layer)

  def generator_objective(trainable, frozen, batch, rng, reid_gate):
    """G's (+ F's, + R's in the joint mode) weighted non-adversarial loss, differentiable in G(s) too.

    -> ((loss, G(s)), (terms, encoder output of s, R's new state)); the GAN and feature-matching terms come
    from the shared pass of D (`adversarial_passes`) and join through G(s)'s cotangent.
    """
    source, target = batch["source"], batch["target"]
    terms, aux = {}, {}
    fake, source_feats = generate(trainable["generator"], source)  # G(s) and the encoder features of s
    # PatchNCE: queries from the encoder of G(s), keys from the encoder of s.
    if use_nce:
      nce_rng, idt_rng = jax.random.split(rng)
      keys = [source_feats[layer] for layer in nce_layers]
      queries = encode(trainable["generator"], fake)
      terms["nce"] = patch_nce(trainable["projector"], queries, keys, nce_rng) * w.nce
      if use_idt:
        # The original scales the image G(r) by weight_idt (not the loss) before encoding it.
        identity, target_feats = generate(trainable["generator"], target)
        keys = [target_feats[layer] for layer in nce_layers]
        queries = encode(trainable["generator"], identity * w.nce_idt)
        terms["nce_idt"] = patch_nce(trainable["projector"], queries, keys, idt_rng)
    # Joint mode: the re-ID loss on the encoder features of s also trains G.
    if joint:
      ce, triplet, acc, aux["reid_batch_stats"] = reid_losses(
          models, trainable["reid"], frozen["reid_batch_stats"], source_feats[encoder_output], batch["pid"],
          w)
      gate = 1.0 if reid_gate is None else reid_gate
      terms["reid_ce"], terms["reid_triplet"], aux["reid_acc"] = gate * ce, gate * triplet, gate * acc
    total = sum(terms.values(), jnp.zeros((), jnp.float32))
    return (total, fake), (terms, source_feats[encoder_output], aux)

  # D sees G(s) (its fake score; its features for both feature-matching terms), r (its real score; the target
  # of G's feature matching) and s (the source of D's feature matching). One forward pass of D serves G's and
  # D's objectives - both use D's parameters from before this step's update, as the original's separate
  # passes do - and the two backward passes take from it what each needs: G's the input gradient on G(s), D's
  # the parameter gradient.
  adversarial = w.gan > 0 or w.sim > 0 or w.dis > 0
  feature_layers = dis_layers if w.sim > 0 else ()
  real_images = (("target",) if w.dis > 0 or w.sim > 0 else ()) + (("source",) if w.sim > 0 else ())

  def adversarial_passes(d_params, batch, fake):
    """((D's outputs on G(s), vjp), (D's outputs on the real images, vjp) or None); outputs are (score or
    None, [features at dis_layers])."""
    on_fake = functools.partial(discriminate, feature_layers=feature_layers, score=w.gan > 0 or w.dis > 0)
    fake_pass = jax.vjp(on_fake, d_params, fake)
    if not real_images:
      return fake_pass, None
    reals = jnp.concatenate([batch[name] for name in real_images])
    # D treats every image on its own (instance norm), so one pass over [r; s] equals two.
    real_pass = jax.vjp(functools.partial(
        discriminate, x=reals, feature_layers=feature_layers, score=w.dis > 0), d_params)
    return fake_pass, real_pass

  def split_reals(outputs):
    """D's (score, features) on [r; s] -> {name: (score, features)}."""
    score, feats = outputs
    pieces = lambda y: dict(zip(real_images, jnp.split(y, len(real_images))))
    scores = pieces(score) if score is not None else dict.fromkeys(real_images)
    feats = [pieces(f) for f in feats]
    return {name: (scores[name], [f[name] for f in feats]) for name in real_images}

  def generator_adversarial(fake_outputs, real_outputs):
    """G's LSGAN (D should score G(s) as real) and feature matching (D's features of G(s) towards r's)."""
    fake_score, fake_feats = fake_outputs
    terms = {}
    if w.gan > 0:
      terms["gen_gan"] = losses.lsgan_loss(fake_score, target_is_real=True) * w.gan
    if w.sim > 0:
      real_feats = split_reals(real_outputs)["target"][1]
      terms["gen_sim"] = losses.feature_matching_loss(real_feats, fake_feats, w.sim_type) * w.sim
    return sum(terms.values(), jnp.zeros((), jnp.float32)), terms

  def discriminator_adversarial(fake_outputs, real_outputs):
    """D's LSGAN on r (real) and the stopped G(s) (fake), and feature matching between D(s) and D(G(s))."""
    fake_score, fake_feats = fake_outputs
    reals = split_reals(real_outputs) if real_outputs is not None else {}
    terms = {}
    if w.dis > 0:
      terms["dis_real"] = losses.lsgan_loss(reals["target"][0], target_is_real=True) * w.dis
      terms["dis_fake"] = losses.lsgan_loss(fake_score, target_is_real=False) * w.dis
    if w.sim > 0:
      terms["dis_sim"] = losses.feature_matching_loss(reals["source"][1], fake_feats, w.sim_type) * w.sim
    return sum(terms.values(), jnp.zeros((), jnp.float32)), terms

  def reid_objective(reid_params, batch_stats, features, pids):
    ce, triplet, acc, new_stats = reid_losses(models, reid_params, batch_stats, features, pids, w)
    return ce + triplet, (ce, triplet, acc, new_stats)

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    params, batch_stats = state.params, state.batch_stats
    lrs = {name: fn(state.step) for name, fn in lr_fns.items()}
    reid_gate = _reid_gate(config, state.step, steps_per_epoch)
    metrics = {name: jnp.zeros((), jnp.float32) for name in LOSS_METRICS}
    metrics["reid_acc"] = jnp.zeros((), jnp.float32)
    grads, new_stats = {}, {}

    # --- G's forward pass (with F's and, in the joint mode, R's), then D's shared pass.
    if train_generator:
      trainable_names = ["generator"] + (["projector"] if use_nce else []) + (["reid"] if joint else [])
      trainable = {name: params[name] for name in trainable_names}
      frozen = {"reid_batch_stats": batch_stats["reid"]}
      (g_loss, fake), g_vjp, (g_terms, reid_input, aux) = jax.vjp(
          lambda t: generator_objective(t, frozen, batch, rng, reid_gate), trainable, has_aux=True)
      metrics.update(g_terms)
      if joint:
        new_stats["reid"], metrics["reid_acc"] = aux["reid_batch_stats"], aux["reid_acc"]
    else:  # no loss trains G: it only translates (for D) and encodes (for the disjoint R)
      fake, source_feats = generate(params["generator"], batch["source"])
      reid_input = source_feats[encoder_output]

    fake_cotangent = jnp.zeros_like(fake)
    if adversarial:
      (fake_outputs, fake_vjp), real_pass = adversarial_passes(params["discriminator"], batch, fake)
      real_outputs, real_vjp = real_pass if real_pass is not None else (None, None)
      if train_generator and (w.gan > 0 or w.sim > 0):
        (_, adv_terms), outputs_cotangent = jax.value_and_grad(generator_adversarial, has_aux=True)(
            fake_outputs, real_outputs)
        metrics.update(adv_terms)
        _, fake_cotangent = fake_vjp(outputs_cotangent)  # D's parameter gradient here is unused (pruned)
      if train_discriminator:
        # D's objective on the stopped translations, from the same pass.
        (_, d_terms), (fake_ct, real_ct) = jax.value_and_grad(
            discriminator_adversarial, argnums=(0, 1), has_aux=True)(fake_outputs, real_outputs)
        metrics.update(d_terms)
        d_grads, _ = fake_vjp(fake_ct)  # G(s) stopped: its input gradient is unused (pruned)
        if real_vjp is not None:
          d_grads = jax.tree.map(jnp.add, d_grads, real_vjp(real_ct)[0])
        grads["discriminator"] = d_grads

    # --- G, F (and R in the joint mode): one gradient, the GAN terms joining through G(s).
    if train_generator:
      grads.update(g_vjp((jnp.ones_like(g_loss), fake_cotangent))[0])

    # --- Disjoint mode: R on the stopped encoder features.
    if disjoint:
      grads["reid"], (ce, triplet, acc, new_stats["reid"]) = jax.grad(reid_objective, has_aux=True)(
          params["reid"], batch_stats["reid"], jax.lax.stop_gradient(reid_input), batch["pid"])
      gate = 1.0 if reid_gate is None else reid_gate
      metrics.update(reid_ce=gate * ce, reid_triplet=gate * triplet, reid_acc=gate * acc)

    # --- Every network's update (D's from its parameters before the step, as the original's order gives).
    new_state, metrics[NONFINITE_METRIC] = apply_updates(
        state, optimizers, lrs, grads, new_stats, {k: metrics[k] for k in LOSS_METRICS}, reid_gate, guard)
    metrics.update({learning_rate_metric(name): lr for name, lr in lrs.items()})
    return new_state, metrics

  return train_step


def _make_baseline_step(config, models: Models, optimizers, lr_fns, steps_per_epoch, guard):
  """Direct transfer: ResNet-50 (stem + R) trained with the re-ID losses on the source images only."""
  w = config.loss
  if not (w.reid_ce > 0 or w.reid_triplet > 0):
    raise ValueError("The ResNet-50 baselines train with the re-ID losses only; set config.loss.reid_ce "
                     "and/or config.loss.reid_triplet > 0.")

  def objective(trainable, batch_stats, source, pids):
    feats, stem_vars = models.stem.apply({"params": trainable["stem"], "batch_stats": batch_stats["stem"]},
                                         source, train=True, mutable=["batch_stats"])
    ce, triplet, acc, reid_stats = reid_losses(models, trainable["reid"], batch_stats["reid"], feats, pids, w)
    return ce + triplet, (ce, triplet, acc, {"stem": stem_vars["batch_stats"], "reid": reid_stats})

  def train_step(state: TrainState, batch, rng):
    del rng  # nothing random in the baseline step
    lrs = {name: fn(state.step) for name, fn in lr_fns.items()}
    grads, (ce, triplet, acc, new_stats) = jax.grad(objective, has_aux=True)(
        state.params, state.batch_stats, batch["source"], batch["pid"])
    reid_gate = _reid_gate(config, state.step, steps_per_epoch)
    gate = 1.0 if reid_gate is None else reid_gate
    metrics = {name: jnp.zeros((), jnp.float32) for name in LOSS_METRICS}
    metrics.update(reid_ce=gate * ce, reid_triplet=gate * triplet, reid_acc=gate * acc, lr_reid=lrs["reid"])
    new_state, metrics[NONFINITE_METRIC] = apply_updates(
        state, optimizers, lrs, grads, new_stats, {k: metrics[k] for k in LOSS_METRICS}, reid_gate, guard)
    return new_state, metrics

  return train_step


def make_train_step(config, models: Models, optimizers: dict[str, Any], steps_per_epoch: int, mesh,
                    compiler_options: dict[str, Any] | None = None
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """The jitted step (state, batch, rng) -> (state, metrics) over `mesh`.

  state: replicated (sharding.replicate) and donated; batch: {"source" (B,H,W,3), "pid" (B,), "target"
  (B,H,W,3) or None when no loss reads it} split over the "data" axis (sharding.make_global_batch); rng: the
  run's key, replicated (the step folds in state.step). Metrics are global scalars: the weighted loss terms
  (LOSS_METRICS, 0 when off), reid_acc (percent), lr_<network> of every trained network and nonfinite (1.0
  when the step was skipped for a non-finite loss or gradient). `compiler_options` go to XLA on top of
  compile_options.compiler_options() (e.g. {"xla_backend_optimization_level": 0} compiles about twice as fast,
  for tests). The "auto" forms, guard and compiler options are those of the mesh's platform (forms.py): a
  mesh of compile-only TPU devices gives the TPU program on any host.
  """
  check_batch_size(config.train.batch_size, mesh)
  lr_fns = {name: optim.create_learning_rate_fn(config.optim[OPTIMIZER_CONFIG[name]], steps_per_epoch)
            for name in optimizers}
  make = _make_baseline_step if config.model.backbone in BASELINE_BACKBONES else _make_method_step
  guard = forms.nonfinite_guard(config.train.get("nonfinite_guard", "auto"), mesh)
  step = forms.traced_for(make(config, models, optimizers, lr_fns, steps_per_epoch, guard), mesh)
  replicated = replicated_sharding(mesh)
  return jax.jit(step, in_shardings=(replicated, batch_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=compile_options.compiler_options(compiler_options, mesh))
