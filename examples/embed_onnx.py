"""Embeds every image under a folder with an exported embedder and onnxruntime alone (no JAX, no
synth_reid_jax): what a tracking or search service copies.

  pip install onnxruntime numpy pillow
  python examples/embed_onnx.py --export=<launch.py --mode=export's --output> --images=<folder> \
      --output=features.npz

Writes `features` (N x D float32) and `paths` (relative to --images, sorted), the same numbers that
`launch.py --mode=extract` writes for those files: images are resized to the exported size as extract does
(PIL bilinear); normalisation and the flip are inside the model.
"""

import argparse
import hashlib
import json
import os

import numpy as np
import onnxruntime
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(folder):
  """Relative paths of every image under `folder` (recursively, sorted), as extract lists them."""
  return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder)
                for name in names if name.lower().endswith(EXTENSIONS) and not name.startswith("."))


def load(path, height, width):
  """RGB uint8 (height, width, 3), resized with PIL's bilinear filter as extract does."""
  with Image.open(path) as image:
    image = image.convert("RGB")
    if image.size != (width, height):
      image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image)


def read_artefact(folder, name, description):
  """The artefact's bytes, refused if they are not the ones embedder.json describes."""
  with open(os.path.join(folder, name), "rb") as f:
    data = f.read()
  if hashlib.sha256(data).hexdigest() != description["files"][name]["sha256"]:
    raise SystemExit(f"{name} does not match the sha256 in embedder.json: re-export or copy both again.")
  return data


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--export", required=True, help="folder holding embedder.onnx and embedder.json")
  parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
  parser.add_argument("--output", required=True, help=".npz to write (features, paths)")
  parser.add_argument("--batch_size", type=int, default=32)
  args = parser.parse_args()

  with open(os.path.join(args.export, "embedder.json")) as f:
    description = json.load(f)
  model = read_artefact(args.export, "embedder.onnx", description)
  session = onnxruntime.InferenceSession(model, providers=onnxruntime.get_available_providers())
  height, width = description["height"], description["width"]
  paths = list_images(args.images)
  if not paths:
    raise SystemExit(f"No images ({', '.join(EXTENSIONS)}) under {args.images}.")
  features = []
  for start in range(0, len(paths), args.batch_size):
    batch = np.stack([load(os.path.join(args.images, p), height, width)
                      for p in paths[start:start + args.batch_size]])  # (n, H, W, 3) uint8 RGB
    features.append(session.run([description["output_name"]], {description["input_name"]: batch})[0])
  features = np.concatenate(features)
  np.savez(args.output, features=features, paths=np.asarray(paths))
  print(f"Wrote {features.shape[0]} x {features.shape[1]} features to {args.output}.")


if __name__ == "__main__":
  main()
