"""GTA -> Market-1501: the thesis setting (42.6 mAP / 61.2 rank-1 on Market)."""

from configs import default, tiny


def get_config(arg=None):
  config = default.get_config()
  config.data.source = "gta_synthreid"
  config.data.target = "market1501"
  config.data.eval_datasets = ("market1501",)  # the target is also the thesis' test set
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
