"""Images/s of the training input pipeline (decode + resize + augment + batch + normalise) on synthetic JPEGs.

python benchmarks/input_pipeline.py [--batch_size=8 --num_images=512 --image_size=128x64 --workers=0,2
                                     --steps=200 --json --profile]
The records are in-memory JPEGs the size of Market / GTA crops (128x64), so file reading is not measured; the
images are resized to config.data.height x width (256x128) with the config's train transforms. The first row
is the CPU time of one thread building batches (independent of other load on the machine); the others are
wall-clock rates of the stream with 0 (threads in this process) or N worker processes.
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import default as default_config  # noqa: E402
from synth_reid_jax import input_pipeline  # noqa: E402

JPEG_QUALITY = 95
WARMUP_STEPS = 10


def synthetic_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  """A JPEG with smooth colour regions plus sensor-like noise, so it compresses like a real person crop."""
  coarse = rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.int16)
  image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


def synthetic_records(num_images: int, height: int, width: int, num_ids: int = 32, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [{"image": synthetic_jpeg(rng, height, width), "pid": i % num_ids, "camid": i % 6,
           "filename": f"{i % num_ids:04d}_c{i % 6}_{i:06d}.jpg"} for i in range(num_images)]


def make_config(args, num_workers):
  config = default_config.get_config()
  config.train.batch_size = args.batch_size
  config.data.num_workers = num_workers
  config.data.n_samples = 0
  config.data.combineall = False
  return config


def time_stream(args, records, num_workers) -> dict:
  """Batches/s of the source stream after WARMUP_STEPS batches (worker start-up excluded)."""
  stream = input_pipeline.create_source_pipeline(make_config(args, num_workers), 0, 1,
                                                 data_sources={"train": records})
  for _ in range(WARMUP_STEPS):
    next(stream.iterator)
  start = time.perf_counter()
  for _ in range(args.steps):
    batch = next(stream.iterator)
  seconds = time.perf_counter() - start
  stream.iterator.close()
  assert batch["image"].shape == (args.batch_size, 256, 128, 3) and batch["image"].dtype == np.float32
  images = args.steps * args.batch_size
  return {"num_workers": num_workers, "images_per_s": images / seconds,
          "ms_per_batch": 1e3 * seconds / args.steps}


def time_cpu(args, records) -> dict:
  """Images per CPU-second of building batches in this thread: the pipeline's cost, whatever else runs."""
  stream = input_pipeline.create_source_pipeline(make_config(args, 0), 0, 1, data_sources={"train": records})
  stream.batches[0]
  start = time.process_time()
  for k in range(1, args.steps + 1):
    stream.batches[k]
  seconds = time.process_time() - start
  return {"num_workers": "1 thread, CPU time", "images_per_s": args.steps * args.batch_size / seconds,
          "ms_per_batch": 1e3 * seconds / args.steps}


def profile(args, records, top: int = 25):
  """cProfile of building batches in this thread (no prefetching), the work every worker does."""
  stream = input_pipeline.create_source_pipeline(make_config(args, 0), 0, 1, data_sources={"train": records})
  profiler = cProfile.Profile()
  profiler.enable()
  for k in range(args.steps):
    stream.batches[k]
  profiler.disable()
  pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--image_size", default="128x64", help="source JPEG height x width")
  parser.add_argument("--workers", default=f"0,{os.cpu_count()}", help="comma-separated worker counts")
  parser.add_argument("--steps", type=int, default=200, help="timed batches per setting")
  parser.add_argument("--json", action="store_true", help="print a JSON line of the results last")
  parser.add_argument("--profile", action="store_true", help="print a cProfile of the in-process path")
  args = parser.parse_args()
  height, width = (int(v) for v in args.image_size.split("x"))
  records = synthetic_records(args.num_images, height, width)
  mean_bytes = np.mean([len(r["image"]) for r in records])
  print(f"{args.num_images} synthetic {height}x{width} JPEGs ({mean_bytes / 1024:.1f} KiB each) -> 256x128, "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs")
  if args.profile:
    profile(args, records)
  results = [time_cpu(args, records)] + [time_stream(args, records, int(w)) for w in args.workers.split(",")]
  print(f"{'num_workers':>18}  {'images/s':>9}  {'ms/batch':>8}")
  for r in results:
    print(f"{r['num_workers']:>18}  {r['images_per_s']:>9.0f}  {r['ms_per_batch']:>8.2f}")
  if args.json:
    print(json.dumps({"batch_size": args.batch_size, "image_size": [height, width], "results": results}))


if __name__ == "__main__":
  main()
