"""Every knob of synth-reid-jax, documented. Experiments start from `get_config()` and change a few values.

Values are the thesis setting (GTA -> real, `*_11_bottle.yaml` of the original code) unless noted. What each
key may hold (types, ranges, constraints between keys) is `RULES` / `CROSS_RULES` in
synth_reid_jax/config_checks.py, checked before a run reads, writes or compiles anything; a key added here
needs a rule there (tests/test_configs.py). A resumed run may change only the keys of
`config_checks.RESUMABLE_KEYS` (how long it trains, logging, evaluation, checkpointing, data locations and
loading speed); any other change is refused, as it would change what the checkpoints mean.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 10  # the original's train.seed

  # --- Data -------------------------------------------------------------------------------------
  data = config.data = ml_collections.ConfigDict()
  data.source = "gta_synthreid"  # labelled synthetic TFDS dataset (train split, more with combineall)
  data.target = "dukemtmc_reid"  # unlabelled real TFDS dataset (its train split)
  data.eval_datasets = ("market1501",)  # real datasets evaluated (query vs gallery); the thesis: Market
  data.manual_dir = "~/reid_data"  # where the downloaded datasets live, in their released layouts
  data.data_dir = "~/tensorflow_datasets"  # where the prepared TFDS (array_record) datasets are written
  data.height = 256  # every image is resized to height x width (must be a multiple of 4)
  data.width = 128
  data.n_samples = 20  # at most this many source images per identity (0 keeps all)
  data.combineall = True  # source = train + gallery (+ query, see below) of the source, relabelled 0..N-1
  # The original merges train + gallery only (its combine_all(include_query=False)); True also merges query
  # images (torchreid's behaviour). GTASynthReid's query ids are gallery ids, so the classes agree.
  data.combineall_query = False
  # Train augmentations, applied in torchreid's order whatever the order here: "pad", "random_crop" (a
  # height x width window at a random position: with pad, torchreid's pad + random_crop), or
  # "random_crop_translate", "random_flip", "color_jitter", then normalisation, then "random_erase".
  data.transforms = ("random_flip", "random_crop_translate")
  data.crop_scale = 1.125  # random_crop_translate: resize to this factor before a random crop
  data.crop_prob = 0.5  # random_crop_translate: probability of the resize-and-crop
  data.pad_size = 10  # pad: black border in pixels on every side (torchreid's Pad(10))
  # color_jitter (torchvision's ColorJitter, as torchreid builds it): brightness, contrast and saturation
  # factors uniform in [1 - s, 1 + s], hue shift uniform in [-h, h]; 0 leaves that adjustment out.
  data.jitter_brightness = 0.2
  data.jitter_contrast = 0.15
  data.jitter_saturation = 0.0
  data.jitter_hue = 0.0
  # random_erase (torchreid's RandomErasing): with probability erase_prob, a rectangle covering a fraction
  # uniform in erase_area of the image, aspect (height / width) uniform in [erase_aspect, 1 / erase_aspect],
  # filled with data.mean in normalised units (as torchreid does).
  data.erase_prob = 0.5
  data.erase_area = (0.02, 0.4)
  data.erase_aspect = 0.3
  data.mean = (0.5, 0.5, 0.5)  # normalisation: (x / 255 - mean) / std
  data.std = (0.5, 0.5, 0.5)
  data.num_workers = 2  # grain worker processes per host (0 = read in the main process)
  # Batches buffered per worker process. With num_workers=0, training batches are built in the trainer's own
  # prefetching thread and evaluation batches by this many threads.
  data.prefetch = 2
  data.sampler = "random"  # "random" or "pk" (P identities x K images, for the triplet loss)
  data.num_instances = 4  # K of the PK sampler
  # Validation on held-out identities, evaluated as "<dataset>-val" (eval/<dataset>-val.json) at every
  # evaluation and ranking the kept "best" checkpoint. With a target (the method) it is the original's
  # adversarial `adv_val`: val_ids identities of the TARGET's train split, drawn with config.seed, leave the
  # target stream; the source stays whole. The original hard-codes 200 for Market and Duke and has no split
  # for CUHK03 or MSMT17 (its val mode fails there); we hold them out the same way for every target. Without a
  # target (the baselines, configs/baseline.py: 50) they are source identities (after n_samples), left out of
  # the source classes, as its plain `val`. The held-out images are the validation gallery; one image per
  # (identity, camera), drawn with config.seed, is also the validation query (the original takes the first
  # in its list order).
  data.val = False
  data.val_ids = 200
  # MSMT17 only: add list_val.txt's images (more images of the train identities; the release's full training
  # set of 32,621 images) to its train split wherever it trains. False: as torchreid, only a source with
  # combineall gets them; the target trains on list_train.txt's 30,248 images.
  data.msmt17_list_val = False
  # The target stream starts a fresh pass (a new permutation) at each source epoch, and again when it runs out
  # within one, as the original's loader; False: one continuous stream of target epochs.
  data.target_restarts = True

  # --- Models -----------------------------------------------------------------------------------
  model = config.model = ml_collections.ConfigDict()
  # What R reads: G's encoder ("generator", the method), or a ResNet-50 stem for direct transfer:
  # "resnet50_plain" (torchreid's resnet50: pooled 2048-d feature at test, no BNNeck; configs/baseline.py) or
  # "resnet50" (the same with R's BNNeck head).
  model.backbone = "generator"
  model.ngf = 64  # generator base width (encoder output has 4 * ngf channels)
  model.n_blocks = 9  # generator residual blocks (encoder layers 4 .. 3 + n_blocks)
  model.ndf = 64  # discriminator base width
  model.projector_dim = 256  # width of the patch-wise projection MLPs (feature_net_nc)
  model.reid_stages = (4, 6, 3)  # ResNet-50 bottlenecks in stages 2, 3, 4
  model.reid_width = 64  # ResNet base width (stage 2 has 2 * width planes, 8 * width * 4 output channels)
  # Compute dtype: "float32", or "bfloat16" on GPU/TPU (params, optimiser states and normalisation statistics
  # stay float32). On TPU, float32 matrix products and convolutions run as bfloat16 passes unless
  # jax_default_matmul_precision says otherwise (README, GPU and TPU).
  model.dtype = "float32"
  model.remat = False  # rematerialise the generator's residual blocks (saves memory, costs compute)
  # Forms of the convolution kinds that have two (synth_reid_jax/models/forms.py): "auto" (the CPU-tuned forms
  # on CPU, the plain lax forms on GPU and TPU), "xla" (plain everywhere) or "cpu" (CPU-tuned everywhere).
  # Every form computes the same numbers up to float32 rounding.
  model.conv_impl = "auto"
  # Optional .npz of ImageNet ResNet-50 weights (python -m synth_reid_jax.tools.import_torch --resnet50=...):
  # loads the baselines' stem and R's stages 2-4; the classifier and BNNeck keep their init. The original's
  # baseline starts from ImageNet; its method trains R from scratch.
  model.pretrained_reid = ""

  # --- Losses (names of the original config in the comments) ------------------------------------
  loss = config.loss = ml_collections.ConfigDict()
  loss.gan = 1.0  # weight_gen: LSGAN generator loss
  loss.dis = 0.5  # weight_dis: each of the discriminator's real and fake LSGAN terms
  loss.nce = 0.5  # weight_nce: PatchNCE between s and G(s)
  loss.nce_idt = 0.0  # weight_idt: identity PatchNCE between r and G(r) (the original scales G(r) by it)
  loss.sim = 0.5  # weight_sim: adversarial feature matching on discriminator features
  loss.sim_type = "feat_match"  # sim_type_loss: "feat_match" (MSE of features) or "gram_match"
  loss.reid_ce = 0.5  # weight_x: re-ID cross-entropy
  loss.reid_triplet = 0.0  # weight_t: batch-hard triplet
  loss.triplet_margin = 0.3
  loss.label_smoothing = 0.1
  loss.nce_temperature = 0.07
  loss.num_patches = 256
  loss.nce_layers = (0, 2, 3, 4, 8)  # encoder layers (0 = padded input, 1-3 convs, 4-12 blocks)
  loss.dis_layers = (1, 2, 3, 4)  # discriminator layers for feature matching (0..5, 5 = output)
  loss.guide_gen = True  # True: re-ID loss also trains G (joint); False: R on stopped features (disjoint)
  loss.reid_start_epoch = 1  # epoch_id: 1-based epoch from which the re-ID loss is on

  # --- Optimisers: torch-style Adam (L2 decay added to the gradient), multi-step decay by epoch ---
  optim = config.optim = ml_collections.ConfigDict()
  for name, b2, wd, milestones in (
      ("generator", 0.999, 5e-4, (40,)),
      ("discriminator", 0.999, 5e-4, (40,)),
      ("projector", 0.99, 5e-3, (40,)),
      ("reid", 0.999, 5e-4, (30, 40)),
  ):
    o = optim[name] = ml_collections.ConfigDict()
    o.lr = 2e-4
    o.b1 = 0.5
    o.b2 = b2
    o.eps = 1e-8
    o.weight_decay = wd
    o.milestones = milestones  # epochs after which the learning rate is multiplied by gamma
    o.gamma = 0.1

  # --- Training ---------------------------------------------------------------------------------
  train = config.train = ml_collections.ConfigDict()
  train.batch_size = 8  # global batch of source images (and as many target images)
  train.num_epochs = 60  # epochs over the (subsampled) source set
  train.num_steps = ml_collections.config_dict.placeholder(int)  # when set, overrides num_epochs
  train.log_every_steps = 50
  train.eval_every_epochs = 10
  train.checkpoint_every_steps = 1000
  train.keep_checkpoints = 3  # keep this many latest checkpoints (plus the best by mAP)
  train.sample_every_steps = 1000  # PNG grid of source | translated | target
  train.num_samples = 8  # images per grid
  train.on_nonfinite = "stop"  # "stop" (keep the last good checkpoint) or "skip" the step
  # Form of the in-step check that skips such a step: "auto" (models/forms.py: "cond" on CPU, "select" on
  # GPU/TPU), "select" or "cond"; the same numbers either way.
  train.nonfinite_guard = "auto"
  # Warn (once, and mark the metrics rows "diverging") when a logged loss exceeds this many times its first
  # logged value: a run can diverge with finite losses.
  train.divergence_factor = 100.0

  # --- Evaluation -------------------------------------------------------------------------------
  ev = config.eval = ml_collections.ConfigDict()
  ev.batch_size = 100
  ev.flip = True  # eval_flip: add the feature of the horizontally flipped image
  ev.metric = "euclidean"  # "euclidean" (squared) or "cosine"
  ev.normalize = False  # L2-normalise features before the distance
  ev.rerank = False  # k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)
  ev.cuhk03_metric = False  # CUHK03 single-gallery-shot CMC
  ev.ranks = (1, 5, 10, 20)
  ev.visrank_topk = 0  # > 0: save a ranked-results picture with this many gallery images per query
  # AdaBN (Li et al., 2016; not in the original): before every evaluation and checkpoint, R's BatchNorm
  # statistics are re-estimated on the target's training images (unaugmented, through G's encoder; without the
  # held-out validation identities), so what is evaluated, saved and extracted normalises real images with
  # real statistics. Training is unchanged (R trains on batch statistics). Needs a target (the method). It
  # acts while training: checkpoints hold the statistics, which --mode=eval / extract / export read as is.
  ev.adabn = False

  return config
