"""GTA -> MSMT17 (V1): not a thesis setting, the same recipe.

The target trains on list_train.txt, unlabelled, as torchreid's train split;
`--config.data.msmt17_list_val=True` adds list_val.txt's images (the release's full training set).
"""

from configs import default, tiny


def get_config(arg=None):
  config = default.get_config()
  config.data.source = "gta_synthreid"
  config.data.target = "msmt17"
  # As the thesis settings: Market first (it picks the best checkpoint), then the target's own test set, which
  # shows how well the translation adapted to the domain it saw.
  config.data.eval_datasets = ("market1501", "msmt17")
  return tiny.shrink(config) if tiny.is_tiny(arg) else config
