"""GTA -> DukeMTMC-reID: the thesis setting (40.7 mAP / 59.5 rank-1 on Market)."""

from configs import default, tiny


def get_config(arg=None):
  config = default.get_config()
  config.data.source = "gta_synthreid"
  config.data.target = "dukemtmc_reid"
  # The thesis reports every run on Market (listed first: it picks the best checkpoint); the target's own
  # test set shows how well the translation adapted to the domain it saw.
  config.data.eval_datasets = ("market1501", "dukemtmc_reid")
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
