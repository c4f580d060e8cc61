"""The demo's direct-transfer baseline: the thesis' baseline row (baseline.py) at the demo's size and budget.

As baseline.py, a ResNet-50-style network (here its stem and layer1 at the demo's width, then the same re-ID
stages as configs/demo.py) learns the synthetic identities alone: no translation, no discriminator, no real
images; it is tested on the real toy domain. Same epochs, batch, learning rates and losses as configs/demo.py.

`--config.model.backbone=generator` gives the ablation instead: the method's own encoder + re-ID network
trained on the synthetic identities without translation (the gap to configs/demo.py is then what the
translation losses alone buy). README.md reports both.
"""

from configs import default, demo, tiny


def get_config(arg=None):
  config = demo.shrink_to_demo(default.get_config())
  config.model.backbone = "resnet50"
  config.loss.gan = config.loss.dis = config.loss.nce = config.loss.nce_idt = config.loss.sim = 0.0
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
