"""Damaged, half-built and concurrently built datasets, and images of every PIL mode: one clear error or a
faithful 8-bit RGB image.

The damage is done to copies of the session's prepared fake datasets; processes are real
(`python -m synth_reid_jax.datasets`, launch.py) where what reaches the user matters.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import fakes
import numpy as np
import processes
import pytest
from PIL import Image

from configs import gta2duke
from synth_reid_jax import inference, input_pipeline
from synth_reid_jax.datasets import builders, images
from synth_reid_jax.errors import DatasetError

DUKE = "dukemtmc_reid"
DUKE_VERSION = os.path.join(DUKE, str(builders.DukemtmcReid.VERSION))
MAX_ERROR_LINES = 6  # what a failed process may print besides progress lines: a few, never a traceback


def copy_prepared(fake_data_dir, data_dir, names=(DUKE,)):
  """A data_dir holding copies of the session's prepared datasets (prepared first if needed)."""
  for name in names:
    shutil.copytree(os.path.join(fake_data_dir, name), os.path.join(data_dir, name))
  return data_dir


@pytest.fixture(scope="module")
def prepared(fake_manual_dir, fake_data_dir):
  for name in ("gta_synthreid", DUKE):
    builders.get_builder(name, fake_data_dir, fake_manual_dir)
  return fake_manual_dir, fake_data_dir


def shard(folder, split="train"):
  return glob.glob(os.path.join(folder, f"*-{split}.array_record-*"))[0]


def cut(path, size):
  with open(path, "rb") as f:
    data = f.read(size)
  with open(path, "wb") as f:
    f.write(data)


def overwrite(path, text):
  with open(path, "w") as f:
    f.write(text)


# Each leaves a prepared folder that TFDS or array_record cannot read (or reads wrongly).
DAMAGES = {
    "shard cut in the middle": lambda folder: cut(shard(folder), os.path.getsize(shard(folder)) // 2 + 100),
    "shard cut to one 64 KiB block": lambda folder: cut(shard(folder), 64 << 10),
    "empty shard": lambda folder: cut(shard(folder, "query"), 0),
    "missing shard": lambda folder: os.remove(shard(folder, "gallery")),
    "broken dataset_info.json": lambda folder: overwrite(os.path.join(folder, "dataset_info.json"), '{"na'),
    "empty dataset_info.json": lambda folder: overwrite(os.path.join(folder, "dataset_info.json"), ""),
    "missing dataset_info.json": lambda folder: os.remove(os.path.join(folder, "dataset_info.json")),
    "broken features.json": lambda folder: overwrite(os.path.join(folder, "features.json"), "[1, 2"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_dataset_is_named_with_its_folder_and_the_fix(prepared, tmp_path, damage):
  manual_dir, fake_data_dir = prepared
  data_dir = copy_prepared(fake_data_dir, str(tmp_path))
  folder = os.path.join(data_dir, DUKE_VERSION)
  DAMAGES[damage](folder)
  with pytest.raises(DatasetError) as caught:
    builders.summarize(builders.get_builder(DUKE, data_dir, manual_dir))
  message = str(caught.value)
  assert "\n" not in message
  assert message.startswith(f"Dataset {DUKE} in {folder} cannot be read: ")
  assert f"rm -r {folder}) and rerun" in message
  # Nothing was deleted or rebuilt behind the user's back.
  assert os.path.isdir(folder)


def flip_record_bytes(folder, split="train"):
  """Inverts bytes of the first records of a shard (its first chunk starts at byte 64); the index and footer,
  read when the shard is opened, stay intact."""
  path = shard(folder, split)
  data = bytearray(open(path, "rb").read())
  for i in range(100, 300):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def test_a_record_that_cannot_be_read_names_the_dataset(prepared, tmp_path):
  manual_dir, fake_data_dir = prepared
  data_dir = copy_prepared(fake_data_dir, str(tmp_path))
  folder = os.path.join(data_dir, DUKE_VERSION)
  flip_record_bytes(folder)
  records = builders.open_split(builders.get_builder(DUKE, data_dir, manual_dir), "train")  # opens fine
  with pytest.raises(DatasetError, match=rf"^Dataset {DUKE} in {folder} cannot be read: record 0 of split "
                                         r"'train': Corrupted Riegeli.*rm -r"):
    records[0]
  with pytest.raises(DatasetError, match=r"records 0\.\.2 of split 'train'"):
    records.__getitems__([0, 1, 2])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_record_damaged_while_training_reaches_the_caller_as_the_dataset_error(prepared, tmp_path,
                                                                                  num_workers):
  """Damaged after the pipeline read its labels: read in the calling thread or in a grain worker process,
  the error arrives as it was raised."""
  manual_dir, fake_data_dir = prepared
  config = gta2duke.get_config("tiny")
  config.data.manual_dir = manual_dir
  config.data.data_dir = copy_prepared(fake_data_dir, str(tmp_path))
  config.data.num_workers = num_workers
  stream = input_pipeline.create_target_pipeline(config, process_index=0, process_count=1)
  flip_record_bytes(os.path.join(config.data.data_dir, DUKE_VERSION))
  with pytest.raises(DatasetError, match=rf"Dataset {DUKE} in .* cannot be read: record"):
    next(stream.iterator)
  stream.iterator.close()


# Lines that report progress (training's bar, a build's steps), not the error.
PROGRESS = ("%|", "INFO ", "Downloading and preparing")


def assert_one_line_error(output, *fragments):
  """No traceback; after the last progress line, a few lines at most, the last one holding every fragment."""
  assert "Traceback" not in output, output
  lines = [line for line in output.splitlines() if line.strip() and not line.startswith(("I0000", "W0000"))]
  bars = [i for i, line in enumerate(lines) if any(p in line for p in PROGRESS)]
  after = lines[bars[-1] + 1:] if bars else lines
  assert len(after) <= MAX_ERROR_LINES, output
  assert all(f in after[-1] for f in fragments), output


def run_datasets_command(name, data_dir, manual_dir, *args):
  return subprocess.run([sys.executable, "-m", "synth_reid_jax.datasets", name, f"--data_dir={data_dir}",
                         f"--manual_dir={manual_dir}", *args], cwd=processes.REPO, capture_output=True,
                        text=True, timeout=processes.TIMEOUT)


def test_datasets_command_names_a_damaged_dataset_in_one_line(prepared, tmp_path):
  manual_dir, fake_data_dir = prepared
  data_dir = copy_prepared(fake_data_dir, str(tmp_path))
  folder = os.path.join(data_dir, DUKE_VERSION)
  DAMAGES["shard cut in the middle"](folder)
  done = run_datasets_command(DUKE, data_dir, manual_dir, "--json")
  assert done.returncode == 1
  assert done.stdout == ""
  assert_one_line_error(done.stderr, f"error: Dataset {DUKE} in {folder} cannot be read", f"rm -r {folder}")


@pytest.fixture(scope="module")
def launcher_on_copies(prepared, tmp_path_factory):
  """-> start(data_dir, workdir, *args): launch.py on another data_dir (a copy that a test damages)."""
  manual_dir, _ = prepared
  cache = tmp_path_factory.mktemp("jax_cache")

  def start(data_dir, workdir, *args):
    return processes.make_launcher(manual_dir, data_dir, cache)(workdir, *args)
  return start


def test_launch_names_a_half_built_dataset_before_training(prepared, launcher_on_copies, tmp_path):
  _, fake_data_dir = prepared
  data_dir = copy_prepared(fake_data_dir, str(tmp_path / "tfds"), ("gta_synthreid", DUKE))
  folder = os.path.join(data_dir, DUKE_VERSION)
  DAMAGES["broken dataset_info.json"](folder)
  workdir = str(tmp_path / "run")
  code, out = processes.finish(launcher_on_copies(data_dir, workdir))
  assert code == 1
  assert_one_line_error(out, f"FATAL Dataset {DUKE} in {folder} cannot be read: dataset_info.json",
                        f"rm -r {folder}) and rerun")
  assert not os.path.exists(os.path.join(workdir, "config.json"))  # the run never started


@pytest.mark.slow
def test_launch_stops_in_one_line_when_a_record_is_damaged_mid_training_keeping_checkpoints(
    prepared, launcher_on_copies, tmp_path):
  """The target is damaged after two checkpoints: the loader thread meets it; the run ends in the FATAL line
  and the checkpoints stay. (Worker processes: test_a_record_damaged_while_training_reaches_the_caller...)"""
  _, fake_data_dir = prepared
  data_dir = copy_prepared(fake_data_dir, str(tmp_path / "tfds"), ("gta_synthreid", DUKE))
  folder = os.path.join(data_dir, DUKE_VERSION)
  workdir = str(tmp_path / "run")
  proc = launcher_on_copies(data_dir, workdir, "--config.train.num_steps=400",
                            "--config.train.checkpoint_every_steps=2", "--config.train.keep_checkpoints=100")
  processes.wait_for(lambda: "4" in processes.checkpoint_entries(workdir), proc)
  flip_record_bytes(folder)
  code, out = processes.finish(proc)
  assert code == 1, out
  assert_one_line_error(out, f"FATAL Dataset {DUKE} in {folder} cannot be read: record",
                        f"rm -r {folder}) and rerun")
  assert {"2", "4"} <= set(processes.checkpoint_entries(workdir))
  assert processes.steps_logged(workdir)[:4] == [1, 2, 3, 4]


# --- Concurrent builds ----------------------------------------------------------------------------------


def start_build(name, data_dir, manual_dir, log):
  with open(log, "w") as err:
    return subprocess.Popen([sys.executable, "-m", "synth_reid_jax.datasets", name, f"--data_dir={data_dir}",
                             f"--manual_dir={manual_dir}", "--json"], cwd=processes.REPO,
                            stdout=subprocess.PIPE, stderr=err, text=True)


def read(path):
  with open(path) as f:
    return f.read()


def test_two_processes_building_one_dataset_wait_for_each_other(fake_manual_dir, tmp_path):
  """While the build lock is held (here by the test), both builds wait; then one builds, the other reuses."""
  data_dir = str(tmp_path / "tfds")
  logs = [str(tmp_path / f"build{i}.log") for i in range(2)]
  with builders.build_lock("gta_synthreid", data_dir):
    procs = [start_build("gta_synthreid", data_dir, fake_manual_dir, log) for log in logs]
    deadline = time.monotonic() + processes.TIMEOUT
    while not all("waiting for it to finish" in read(log) for log in logs):
      if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
        for p in procs:
          p.kill()
        pytest.fail("a build did not wait for the lock:\n" + "\n".join(read(log) for log in logs))
      time.sleep(processes.POLL_SECONDS)
  summaries = []
  for proc, log in zip(procs, logs):
    out, _ = proc.communicate(timeout=processes.TIMEOUT)
    assert proc.returncode == 0, read(log)
    assert "Traceback" not in read(log)
    summaries.append(json.loads(out))
  assert summaries == [fakes.GTA_EXPECTED, fakes.GTA_EXPECTED]
  built = [log for log in logs if "downloaded and prepared" in read(log)]
  assert len(built) == 1, [read(log) for log in logs]


def test_two_builds_started_together_both_succeed(fake_manual_dir, tmp_path):
  data_dir = str(tmp_path / "tfds")
  logs = [str(tmp_path / f"build{i}.log") for i in range(2)]
  procs = [start_build(DUKE, data_dir, fake_manual_dir, log) for log in logs]
  for proc, log in zip(procs, logs):
    out, _ = proc.communicate(timeout=processes.TIMEOUT)
    assert proc.returncode == 0, read(log)
    assert json.loads(out) == fakes.DUKE_EXPECTED
  assert not glob.glob(os.path.join(data_dir, DUKE, "incomplete.*"))


def test_a_build_that_was_stopped_is_cleaned_up_and_redone(fake_manual_dir, tmp_path):
  data_dir = str(tmp_path / "tfds")
  leftover = os.path.join(data_dir, DUKE, f"incomplete.ABC123_{builders.DukemtmcReid.VERSION}")
  os.makedirs(leftover)
  open(os.path.join(leftover, f"{DUKE}-train.array_record-00000-of-00001"), "wb").close()
  builder = builders.get_builder(DUKE, data_dir, fake_manual_dir)
  assert builders.summarize(builder) == fakes.DUKE_EXPECTED
  assert not os.path.exists(leftover)


def test_a_data_dir_that_cannot_be_written_is_one_error(fake_manual_dir, tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(DatasetError, match=r"Cannot build dukemtmc_reid into data_dir .*file.*Not a directory"):
    builders.get_builder(DUKE, str(tmp_path / "file" / "tfds"), fake_manual_dir)


# --- Image modes ------------------------------------------------------------------------------------------


GRADIENT_16 = (np.arange(24 * 12, dtype=np.int64).reshape(24, 12) * 227).astype(np.uint16)  # 0 .. 65,021
RGBA = np.random.default_rng(0).integers(0, 256, (24, 12, 4), dtype=np.uint8)


def mode_files(folder):
  """{name: (path, expected uint8 RGB)}: real files of every mode the tools can meet."""
  rgb = RGBA[..., :3]
  scaled_16 = np.round(GRADIENT_16 / 257.0).astype(np.uint8)
  gray = rgb[..., 0]
  palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  cases = {
      "L.png": (Image.fromarray(gray), np.stack([gray] * 3, -1)),
      "1.png": (Image.fromarray(gray > 127), np.stack([np.where(gray > 127, 255, 0)] * 3, -1)),
      "RGB.png": (Image.fromarray(rgb), rgb),
      "RGBA.png": (Image.fromarray(RGBA), rgb),  # alpha dropped: the stored colours stay
      "LA.png": (Image.fromarray(np.stack([gray, RGBA[..., 3]], -1), "LA"), np.stack([gray] * 3, -1)),
      "P.png": (palette, np.asarray(palette.convert("RGB"))),
      "P_transparent.png": (palette, np.asarray(palette.convert("RGB"))),
      "I;16.png": (Image.fromarray(GRADIENT_16), np.stack([scaled_16] * 3, -1)),
      "I;16B.tif": (Image.frombytes("I;16B", (12, 24), GRADIENT_16.astype(">u2").tobytes()),
                    np.stack([scaled_16] * 3, -1)),
      "I_16bit.tif": (Image.fromarray(GRADIENT_16.astype(np.int32)), None),  # TIFF says 32 bits: see below
      "I_32bit.tif": (Image.fromarray(GRADIENT_16.astype(np.int32) << 15),
                      np.stack([np.round((GRADIENT_16.astype(np.float64) * 2 ** 15) * 255 / (2 ** 31 - 1))
                                .astype(np.uint8)] * 3, -1)),
      "CMYK.jpg": (Image.fromarray(rgb).convert("CMYK"), None),
      "CMYK.tif": (Image.fromarray(rgb).convert("CMYK"), np.asarray(Image.fromarray(rgb).convert("CMYK")
                                                                    .convert("RGB"))),
      "YCbCr.tif": (Image.fromarray(rgb).convert("YCbCr"), np.asarray(Image.fromarray(rgb).convert("YCbCr")
                                                                      .convert("RGB"))),
  }
  files = {}
  for name, (image, expected) in cases.items():
    path = os.path.join(folder, name)
    options = {"transparency": 3} if name == "P_transparent.png" else {}
    image.save(path, **options)
    files[name] = (path, expected)
  return files


def test_every_mode_is_read_as_faithful_8_bit_rgb(tmp_path):
  files = mode_files(str(tmp_path))
  for name, (path, expected) in files.items():
    with Image.open(path) as image:
      opened = image.mode
      rgb = np.asarray(images.to_rgb(image, path))
    assert rgb.dtype == np.uint8 and rgb.shape == (24, 12, 3), name
    if expected is not None:
      np.testing.assert_array_equal(rgb, expected, err_msg=f"{name} (opened as {opened})")
  # 16-bit samples are scaled, not clipped: the gradient spans the whole 8-bit range.
  sixteen = np.asarray(images.to_rgb(Image.open(files["I;16.png"][0])))
  assert sixteen.min() == 0 and sixteen.max() == round(65021 / 257) and len(np.unique(sixteen)) > 200
  # A 16-bit image stored in a 32-bit TIFF is read as 32 bits (the file says so): dark, never clipped white.
  assert np.asarray(images.to_rgb(Image.open(files["I_16bit.tif"][0]))).max() <= 1
  # JPEG's CMYK is stored inverted (Adobe); PIL reads it back to the same colours within JPEG's loss.
  cmyk = np.asarray(images.to_rgb(Image.open(files["CMYK.jpg"][0])), np.int64)
  assert np.abs(cmyk - RGBA[..., :3]).mean() < 12


def test_a_palette_image_with_alpha_keeps_its_palette_colours():
  image = Image.fromarray(RGBA).convert("PA")
  expected = np.asarray(image.convert("RGBA"))[..., :3]
  np.testing.assert_array_equal(np.asarray(images.to_rgb(image)), expected)


def test_modes_without_an_8_bit_reading_are_refused_by_name(tmp_path):
  path = str(tmp_path / "depth.tif")
  Image.fromarray(np.linspace(0, 1, 24 * 12, dtype=np.float32).reshape(24, 12)).save(path)
  with pytest.raises(DatasetError, match=rf"image {path}: mode F \(32-bit floating-point"):
    images.to_rgb(Image.open(path), f"image {path}")
  negative = str(tmp_path / "signed.tif")
  Image.fromarray(np.full((4, 4), -5, np.int32)).save(negative)
  with pytest.raises(DatasetError, match="negative samples"):
    images.to_rgb(Image.open(negative))


def test_a_dataset_of_16_bit_and_palette_images_is_built_as_rgb(tmp_path):
  """The builders store every mode as RGB (re-encoded as PNG), scaled as to_rgb reads it; a float image
  stops the build naming the file."""
  manual_dir = str(tmp_path / "manual")
  fakes.make_dukemtmc_reid(manual_dir)
  train = os.path.join(manual_dir, "DukeMTMC-reID", "bounding_box_train")
  first, second = sorted(n for n in os.listdir(train) if n.endswith(".jpg"))[:2]
  Image.fromarray(GRADIENT_16).save(os.path.join(train, first), format="PNG")  # a .jpg name, PNG bytes
  Image.fromarray(RGBA).convert("P").save(os.path.join(train, second), format="PNG", transparency=0)
  builder = builders.get_builder(DUKE, str(tmp_path / "tfds"), manual_dir)
  records = {r["filename"]: r for r in builders.open_split(builder, "train").__getitems__(range(6))}
  sixteen = images.decode_image(records[first]["image"])
  np.testing.assert_array_equal(sixteen[..., 0], np.round(GRADIENT_16 / 257.0).astype(np.uint8))
  assert images.decode_image(records[second]["image"]).shape == (24, 12, 3)

  # A float image stops the build in one line naming the file.
  float_image = os.path.join(train, first)
  Image.fromarray(np.ones((24, 12), np.float32)).save(float_image, format="TIFF")
  done = run_datasets_command(DUKE, str(tmp_path / "tfds2"), manual_dir)
  assert done.returncode == 1
  assert_one_line_error(done.stderr, f"error: image {float_image}: mode F (32-bit floating-point samples)")


def test_translate_and_extract_read_a_16_bit_png_as_its_8_bit_twin(tmp_path):
  """The decode translate and extract run (eval transform, unreadable images skipped): scaled, not clipped."""
  def png(image):
    path = str(tmp_path / f"{image.mode}.png")
    image.save(path)
    with open(path, "rb") as f:
      return f.read()

  transform = inference._SkipUnreadable(gta2duke.get_config("tiny"))
  element = {"pid": 1, "camid": 0, "index": 0, "mask": True}
  sixteen = transform.map(dict(element, image=png(Image.fromarray(GRADIENT_16))))
  eight_bit = np.round(GRADIENT_16 / 257).astype(np.uint8)
  eight = transform.map(dict(element, image=png(Image.fromarray(eight_bit))))
  assert not sixteen["unreadable"] and sixteen["mask"]
  np.testing.assert_array_equal(sixteen["image"], eight["image"])
  assert sixteen["image"].mean() < 200  # the clipped reading was near-white

  path = str(tmp_path / "depth.tif")
  Image.fromarray(np.ones((24, 12), np.float32)).save(path)
  assert "depth.tif" in inference.list_image_files(str(tmp_path))
  assert inference.why_unreadable(path).startswith("the image: mode F (32-bit floating-point samples)")
