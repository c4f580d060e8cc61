"""Re-ID datasets as TFDS array_record builders: GTA_synthReid, Market, Duke, CUHK03, MSMT17, reid_toy.

    builder = get_builder("market1501", data_dir="~/tensorflow_datasets", manual_dir="~/reid_data")
    source = builder.as_data_source("query")  # records {"image", "pid", "camid", "filename"}
    image = decode_image(source[0]["image"])  # uint8 (H, W, 3)

`python -m synth_reid_jax.datasets <name> --manual_dir=<dir> --data_dir=<dir> [--json]` builds one and prints
its summary. The pages under datasets/ say where each dataset comes from and how to lay it out.
"""

from synth_reid_jax.datasets.builders import DATASET_NAMES, get_builder, summarize
from synth_reid_jax.datasets.images import decode_image
from synth_reid_jax.datasets.parsing import SPLITS, Sample, summary_table
from synth_reid_jax.datasets.toy import ToyConfig

__all__ = [
    "DATASET_NAMES",
    "SPLITS",
    "Sample",
    "ToyConfig",
    "decode_image",
    "get_builder",
    "summarize",
    "summary_table",
]
