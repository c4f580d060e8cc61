"""The thesis' ablation grid (GTA -> Market), one variant per loss combination of the original's configs.

`--config=configs/ablations.py:<variant>`, shrunk for a CPU smoke run with `:<variant>,tiny` (or
`:<variant>:tiny`). Every variant is configs/gta2market.py (the grid's yamls all train GTA -> Market and test
on Market) with the loss switches of one file of the original's `configs/adv_resnet/`, all set here explicitly
(`adv_nce_resnet_joint_test_*.yaml`; besides the switches below, each sets weight_gen 1, weight_dis 0.5,
weight_x 0.5, weight_t 0, sim_type_loss feat_match, guide_gen True, the defaults' nce/dis layers and 256
patches):

| variant       | original file (`adv_nce_resnet_joint_test...`) | nce | idt | sim | eval_flip |
|---------------|------------------------------------------------|-----|-----|-----|-----------|
| nce           | `_10_bottle.yaml`                              | 0.5 | 0   | 0   | True      |
| nce_fm        | `_11_bottle.yaml` (the final method)           | 0.5 | 0   | 0.5 | True      |
| nce_idt       | `_12_bottle.yaml`                              | 0.5 | 0.5 | 0   | True      |
| nce_idt_fm    | `_13_bottle.yaml`                              | 0.5 | 0.5 | 0.5 | True      |
| no_nce_no_sim | `_11_bottle_noNCE_noSIM.yaml`                  | 0   | 0   | 0   | False     |
| mapping_only  | `_mapping_only.yaml`                           | 0   | 0   | 0   | True      |

(nce, idt, sim: the files' weight_nce, weight_idt, weight_sim = config.loss.nce, nce_idt, sim.)

nce_fm is the thesis' method (configs/gta2market.py). no_nce_no_sim and mapping_only train the same losses
(the GAN's domain mapping and the re-ID loss, no PatchNCE, no feature matching): the two files differ only in
test.eval_flip (and mapping_only's save_dir, a copy of _10_bottle's).

Seeds: the thesis runs seeds 0, 10 and 100. The original's `_10_bottle` .. `_13_bottle` files have copies
`*_seed0.yaml` / `*_seed100.yaml` that differ only in train.seed; here that is `--config.seed=0` /
`--config.seed=100` (10, the files' own seed, is the default). `python -m synth_reid_jax.tools.summarize`
groups runs that differ only in the seed.
"""

import re

from configs import gta2market, tiny

# variant: (original file suffix, weight_nce, weight_idt, weight_sim, eval_flip)
VARIANTS = {
    "nce": ("_10_bottle", 0.5, 0.0, 0.0, True),
    "nce_fm": ("_11_bottle", 0.5, 0.0, 0.5, True),
    "nce_idt": ("_12_bottle", 0.5, 0.5, 0.0, True),
    "nce_idt_fm": ("_13_bottle", 0.5, 0.5, 0.5, True),
    "no_nce_no_sim": ("_11_bottle_noNCE_noSIM", 0.0, 0.0, 0.0, False),
    "mapping_only": ("_mapping_only", 0.0, 0.0, 0.0, True),
}
ORIGINAL_PREFIX = "configs/adv_resnet/adv_nce_resnet_joint_test"


def original_file(variant):
  """The original code's yaml that the variant reproduces."""
  return f"{ORIGINAL_PREFIX}{VARIANTS[variant][0]}.yaml"


def parse(arg):
  """'<variant>[,tiny]' or '<variant>[:tiny]' -> (variant, tiny); anything else is an error naming them."""
  variant, *rest = re.split(r"[,:]", (arg or "").strip())
  if variant not in VARIANTS or rest not in ([], ["tiny"]):
    raise ValueError(f"Unknown ablation {arg!r}; use --config=configs/ablations.py:<variant> or "
                     f":<variant>,tiny with <variant> one of {tuple(VARIANTS)}.")
  return variant, bool(rest)


def get_config(arg=None):
  variant, is_tiny = parse(arg)
  _, nce, nce_idt, sim, flip = VARIANTS[variant]
  config = gta2market.get_config()
  loss = config.loss
  loss.gan, loss.dis, loss.reid_ce, loss.reid_triplet = 1.0, 0.5, 0.5, 0.0
  loss.nce, loss.nce_idt, loss.sim = nce, nce_idt, sim
  loss.sim_type = "feat_match"
  loss.guide_gen = True
  config.eval.flip = flip
  return tiny.shrink(config) if is_tiny else config
