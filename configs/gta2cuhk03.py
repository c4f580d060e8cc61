"""GTA -> CUHK03 (new protocol, detected boxes as torchreid's default): the thesis setting.

Thesis: 41.6 mAP / 60.0 rank-1 on Market.
"""

from configs import default, tiny


def get_config(arg=None):
  config = default.get_config()
  config.data.source = "gta_synthreid"
  config.data.target = "cuhk03/detected"
  # The thesis reports every run on Market (listed first: it picks the best checkpoint); the target's own
  # test set shows how well the translation adapted to the domain it saw.
  config.data.eval_datasets = ("market1501", "cuhk03/detected")
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
