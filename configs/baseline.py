"""Direct transfer: ResNet-50 trained on GTA identities only, tested on Market (thesis: 23.3 mAP, 39.4 R1).

As the original's `resnet/im_resnet_softmax_02` run: the re-ID losses alone (no generator, discriminator or
projector), plain cross-entropy, batch 32, decay at epochs 20, 30 and 40, every source image. The original
starts from ImageNet weights: set `config.model.pretrained_reid` to a ResNet-50 .npz to do the same.
"""

from configs import default, tiny


def get_config(arg=None):
  config = default.get_config()
  config.data.source = "gta_synthreid"
  config.data.target = ""  # direct transfer never sees real images
  config.data.eval_datasets = ("market1501",)
  config.data.combineall = False
  config.data.n_samples = 0
  config.model.backbone = "resnet50"
  config.loss.gan = config.loss.dis = config.loss.nce = config.loss.nce_idt = config.loss.sim = 0.0
  config.loss.reid_ce = 1.0
  config.loss.label_smoothing = 0.0
  config.loss.reid_start_epoch = 1
  config.optim.reid.b1 = 0.9  # torchreid's Adam default (the translation runs use 0.5)
  config.optim.reid.milestones = (20, 30, 40)
  config.train.batch_size = 32
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
