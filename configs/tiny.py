"""The `:tiny` config argument: an experiment shrunk for a CPU smoke run (tiny images and model, a few steps).

Not an experiment itself; every experiment's `get_config(arg)` calls `is_tiny(arg)` and `shrink(config)`.
"""

VARIANTS = ("", "tiny")


def is_tiny(arg):
  """True for the `:tiny` argument, False for none; anything else is an error naming the choices."""
  arg = (arg or "").strip()
  if arg not in VARIANTS:
    raise ValueError(f"Unknown config argument {arg!r}; use nothing (the full experiment) or ':tiny' "
                     "(e.g. --config=configs/gta2duke.py:tiny).")
  return arg == "tiny"


def shrink(config):
  """Same experiment (datasets, losses, schedule shape) at a size that trains a few steps on a laptop CPU."""
  config.data.height = 32
  config.data.width = 16
  config.data.num_workers = 0
  config.model.ngf = 8
  config.model.n_blocks = 2
  config.model.ndf = 8
  config.model.projector_dim = 16
  config.model.reid_stages = (1, 1, 1)
  config.model.reid_width = 8
  config.model.pretrained_reid = ""
  config.model.dtype = "float32"
  # Encoder layers 0..5 exist with two residual blocks: the last NCE layer moves onto the last block.
  config.loss.nce_layers = tuple(layer for layer in config.loss.nce_layers if layer < 4) + (4, 5)
  config.loss.num_patches = 16
  config.train.batch_size = 4  # the fake dataset trees (tests/fakes.py) have 6 target images
  config.train.num_steps = 4
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 2
  config.train.sample_every_steps = 2
  config.train.num_samples = 4
  config.train.eval_every_epochs = 1000  # only the final evaluation
  config.eval.batch_size = 16
  config.eval.visrank_topk = 0
  return config
