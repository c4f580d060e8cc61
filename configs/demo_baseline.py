"""The demo's direct-transfer baseline: the same networks and budget as configs/demo.py, re-ID losses only.

No translation, no discriminator, no real images: the encoder and the re-ID network learn the synthetic
identities and are tested on the real toy domain. The gap to configs/demo.py is what translation buys.
"""

from configs import default, demo, tiny


def get_config(arg=None):
  config = demo.shrink_to_demo(default.get_config())
  config.loss.gan = config.loss.dis = config.loss.nce = config.loss.nce_idt = config.loss.sim = 0.0
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
