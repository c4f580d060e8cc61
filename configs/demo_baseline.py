"""The demo's direct transfer: baseline.py's recipe (the original's im_resnet_softmax_02) at the demo's size.

As baseline.py: torchreid's plain ResNet-50 layout (model.backbone="resnet50_plain": stem, the demo's
re-ID stages, pooled feature, no BNNeck) learns the synthetic identities alone - no translation, no
discriminator, no real images - from the source's train split only (at most 50 images per identity), with
ImageNet mean/std, random_flip + pad + random_crop, plain cross-entropy and torchreid's Adam (b1 0.9); it is
tested on the real toy domain. What the demo changes, as configs/demo.py does for the method: 64x32 images and
width 16 (so no ImageNet weights: they are ResNet-50's, width 64), the pad scaled with the image (10 px at
256x128 -> 2 px), and demo.py's budget (12 epochs, batch 16, R's learning rate 3e-3, no decay) instead of the
original's 60 epochs at 2e-4 decayed at 20/30/40, which this size does not need.

The method's own encoder + re-ID network trained on the synthetic identities without translation (what the
translation losses alone buy, same recipe as the method) is configs/demo.py with the translation weights at 0:
`--config=configs/demo.py --config.loss.gan=0 --config.loss.dis=0 --config.loss.nce=0 --config.loss.sim=0`.
(`--config.model.backbone=generator` here would mix the two recipes.)
"""

from configs import baseline, default, demo, tiny


def get_config(arg=None):
  config = baseline.direct_transfer(demo.shrink_to_demo(default.get_config()))
  config.data.pad_size = 2  # the original's 10 px at 256x128, scaled to 64x32
  config.data.val_ids = 25  # with data.val: as demo.py, a quarter of the 100 train identities
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
