"""Builds one dataset and prints its torchreid-style summary (`--json`: only the numbers, on stdout).

    python -m synth_reid_jax.datasets market1501 --manual_dir=~/reid_data --data_dir=~/tensorflow_datasets
"""

import argparse
import contextlib
import json
import logging
import sys

from synth_reid_jax.datasets import builders, parsing
from synth_reid_jax.errors import UserError


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m synth_reid_jax.datasets",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("name", help=f"one of: {', '.join(builders.DATASET_NAMES)}")
  parser.add_argument("--manual_dir", default=None, help="folder holding the downloaded dataset as released")
  parser.add_argument("--data_dir", default="~/tensorflow_datasets",
                      help="where prepared datasets are written")
  parser.add_argument("--json", action="store_true", help="print only the summary as JSON on stdout")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
  try:
    # TFDS prints its progress messages on stdout; keep stdout for the summary alone.
    with contextlib.redirect_stdout(sys.stderr):
      builder = builders.get_builder(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
      summary = builders.summarize(builder)
  except (UserError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(summary))
  else:
    print(parsing.summary_table(args.name, summary))
    print(f"  prepared in {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
