"""Direct transfer: torchreid's ResNet-50 trained on GTA identities alone (thesis, Market: 23.3 mAP, 39.4 R1).

The original's `configs/resnet/im_resnet_softmax_02.yaml` on top of its `scripts/default_config.py`, point by
point (yaml key: value -> ours):
- model.name: 'resnet50', last_stride: 2 -> model.backbone="resnet50_plain": torchreid's plain resnet50
  (conv1 .. layer4, every stage 2-4 with stride 2, global average pool, a linear classifier on the pooled
  2048-d feature, which is also the test feature; no BNNeck), initialised as torchreid's _init_params.
- model.pretrained: True -> ImageNet weights. They cannot ship with this repository: convert torchvision's
  resnet50 .pth once (`python -m synth_reid_jax.tools.import_torch --resnet50=resnet50-0676ba61.pth
  --output=resnet50.npz`) and pass `--config.model.pretrained_reid=resnet50.npz`; the stem and stages 2-4 then
  start from it, the classifier from N(0, 0.01). Left empty (the default here) the network starts from random
  weights, which is not the thesis' baseline.
- data.sources: ['gta_synthreid'], combineall: False -> the GTA train split alone; default n_samples: 50 ->
  at most 50 images per identity; data.val: False. With data.val (the original's hard-coded n_val_pids=50
  of GTA's train split) data.val_ids is 50 here: without a target, validation holds out source identities.
- data.targets: ['cuhk03'] -> "cuhk03/detected" (torchreid's default: detected boxes, new protocol); the
  thesis reports the baseline on Market, listed first (it ranks the best checkpoint).
- height 256, width 128; default norm_mean / norm_std: ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224,
  0.225), not the translation runs' 0.5.
- transforms: ['random_flip', 'pad', 'random_crop'] -> the same names (torchreid's Pad(10) + RandomCrop).
- loss: softmax, label_smooth: False -> cross-entropy (weight 1), no smoothing, no triplet; nothing else.
- train: adam, lr 2e-4, weight_decay 5e-4; default adam beta1 0.9, beta2 0.999 -> config.optim.reid (the
  stem is trained by the same optimizer, as torchreid's single Adam over the whole network).
- max_epoch 60, batch_size 32, lr_scheduler multi_step, stepsize [20, 30, 40], default gamma 0.1.
- default train.seed 10 -> config.seed 10 (the `_seed0` / `_seed100` files: --config.seed=0 / 100).
- test: eval_flip True, dist_metric euclidean, normalize_feature False, rerank False, batch_size 100,
  eval_freq 10 -> config.eval and train.eval_every_epochs.
"""

from configs import default, tiny

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def direct_transfer(config):
  """The baseline's recipe on any config: the model, losses, optimiser and data treatment, not the sizes."""
  config.data.target = ""  # direct transfer never sees real images
  config.data.combineall = False
  config.data.combineall_query = False
  config.data.n_samples = 50
  config.data.val_ids = 50  # source identities held out with data.val (GTA_synthReid's n_val_pids)
  config.data.mean = IMAGENET_MEAN
  config.data.std = IMAGENET_STD
  config.data.transforms = ("random_flip", "pad", "random_crop")
  config.model.backbone = "resnet50_plain"
  config.loss.gan = config.loss.dis = config.loss.nce = config.loss.nce_idt = config.loss.sim = 0.0
  config.loss.reid_ce = 1.0
  config.loss.reid_triplet = 0.0
  config.loss.label_smoothing = 0.0
  config.loss.reid_start_epoch = 1
  config.optim.reid.b1 = 0.9  # torchreid's Adam (the translation runs set 0.5)
  config.optim.reid.b2 = 0.999
  config.optim.reid.weight_decay = 5e-4
  config.eval.flip = True
  config.eval.metric = "euclidean"
  config.eval.normalize = False
  config.eval.rerank = False
  return config


def get_config(arg=None):
  config = direct_transfer(default.get_config())
  config.data.source = "gta_synthreid"
  config.data.eval_datasets = ("market1501", "cuhk03/detected")
  config.data.height, config.data.width = 256, 128
  config.data.pad_size = 10
  config.optim.reid.lr = 2e-4
  config.optim.reid.milestones = (20, 30, 40)
  config.optim.reid.gamma = 0.1
  config.train.batch_size = 32
  config.train.num_epochs = 60
  config.train.eval_every_epochs = 10
  config.eval.batch_size = 100
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
