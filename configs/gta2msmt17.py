"""GTA -> MSMT17 (V1, train = list_train + list_val, unlabelled): not a thesis setting, the same recipe."""

from configs import default, tiny


def get_config(arg=None):
  config = default.get_config()
  config.data.source = "gta_synthreid"
  config.data.target = "msmt17"
  # As the thesis settings: Market first (it picks the best checkpoint), then the target's own test set, which
  # shows how well the translation adapted to the domain it saw.
  config.data.eval_datasets = ("market1501", "msmt17")
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
