"""Datasets: torchreid's numbers on fake releases, records, the toy domain pair, the CLI and every error."""

import dataclasses
import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import fakes
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from synth_reid_jax import datasets
from synth_reid_jax.datasets import __main__ as cli
from synth_reid_jax.datasets import builders, parsing, toy

tfds.disable_progress_bar()

EXPECTED = {
    "market1501": fakes.MARKET_EXPECTED,
    "dukemtmc_reid": fakes.DUKE_EXPECTED,
    "gta_synthreid": fakes.GTA_EXPECTED,
    "cuhk03/detected": fakes.CUHK03_NP_EXPECTED,
    "cuhk03/labeled": fakes.CUHK03_NP_EXPECTED,
}


def records(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


# --- Real layouts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_summary_matches_torchreid_numbers(name, fake_manual_dir, fake_data_dir):
  builder = datasets.get_builder(name, fake_data_dir, fake_manual_dir)
  assert datasets.summarize(builder) == EXPECTED[name]


def test_market_records_keep_pid_zero_drop_junk_and_count_cameras_from_zero(fake_manual_dir, fake_data_dir):
  builder = datasets.get_builder("market1501", fake_data_dir, fake_manual_dir)
  train, gallery = records(builder, "train"), records(builder, "gallery")
  kept = sorted(n for n in fakes.MARKET_FILES["bounding_box_test"] if not n.startswith("-1"))
  assert [r["filename"] for r in gallery] == kept  # file order; junk, Thumbs.db, .png and ._ files skipped
  by_name = {r["filename"]: r for r in train}
  assert (by_name["0010_c5s1_001301_03.jpg"]["pid"], by_name["0010_c5s1_001301_03.jpg"]["camid"]) == (10, 4)
  assert by_name["0000_c1s1_000000_01.jpg"]["pid"] == 0  # torchreid keeps pid 0 outside the gallery too
  assert {r["camid"] for r in train} == set(range(6))
  assert sum(r["pid"] == 0 for r in gallery) == 3


def test_records_decode_to_uint8_rgb(fake_manual_dir, fake_data_dir):
  builder = datasets.get_builder("gta_synthreid", fake_data_dir, fake_manual_dir)
  record = records(builder, "query")[0]
  assert isinstance(record["filename"], str) and isinstance(record["pid"], int)
  assert (record["filename"], record["pid"], record["camid"]) == ("20000001_sd003c05_0010.jpeg", 20000001, 4)
  image = datasets.decode_image(record["image"])
  assert image.dtype == np.uint8 and image.shape == (*fakes.IMAGE_SIZE, 3)
  raw = builder.as_data_source("query", decoders={"image": tfds.decode.SkipDecoding()})[0]["image"]
  assert isinstance(raw, bytes)
  with open(os.path.join(fake_manual_dir, "GTA_synthReid", "query", record["filename"]), "rb") as f:
    assert raw == f.read()  # stored byte for byte
  np.testing.assert_array_equal(datasets.decode_image(raw), image)


@pytest.mark.parametrize("folder", ["market1501", "market1501/Market-1501-v15.09.15"])
def test_market_alternative_folders(folder, tmp_path):
  manual = fakes.make_market1501(str(tmp_path / "manual"), folder=folder)
  builder = datasets.get_builder("market1501", str(tmp_path / "data"), manual)
  assert datasets.summarize(builder) == fakes.MARKET_EXPECTED


def test_duke_torchreid_folder(tmp_path):
  manual = fakes.make_dukemtmc_reid(str(tmp_path / "manual"), folder="dukemtmc-reid/DukeMTMC-reID")
  assert datasets.summarize(datasets.get_builder("dukemtmc_reid", str(tmp_path / "data"), manual)) == (
      fakes.DUKE_EXPECTED)


@pytest.mark.parametrize("image_type", ["detected", "labeled"])
def test_cuhk03_from_original_release(image_type, tmp_path):
  manual = fakes.make_cuhk03_release(str(tmp_path / "manual"))
  data_dir = str(tmp_path / "data")
  builder = datasets.get_builder(f"cuhk03/{image_type}", data_dir, manual)
  assert datasets.summarize(builder) == fakes.CUHK03_RELEASE_EXPECTED[image_type]
  query = records(builder, "query")
  first = query[0]  # person 4 (pair 1, 4th person), cell 1: view 1
  assert (first["filename"], first["pid"], first["camid"]) == ("1_004_1_01.png", 4, 0)
  # The cell's image comes back as stored in the .mat: (12 + cell) x (6 + person index) pixels.
  assert datasets.decode_image(first["image"]).shape == (12, 6 + 3, 3)
  assert {r["camid"] for r in query} == {0, 1}
  extracted = os.path.join(data_dir, "downloads", "cuhk03", f"images_{image_type}")
  n_images = sum(len(cells) for pair in fakes.CUHK03_CELLS[image_type] for cells in pair)
  assert len([n for n in os.listdir(extracted) if n.endswith(".png")]) == n_images


def test_cuhk03_prefers_cuhk03_np_folders(fake_manual_dir, tmp_path):
  builder = datasets.get_builder("cuhk03/labeled", str(tmp_path), fake_manual_dir)  # both routes present
  assert datasets.summarize(builder) == fakes.CUHK03_NP_EXPECTED


def test_non_rgb_images_are_stored_as_rgb(tmp_path):
  manual = tmp_path / "manual"
  fakes.make_gta_synthreid(str(manual))
  query = manual / "GTA_synthReid" / "query"
  Image.fromarray(np.full((6, 4), 200, np.uint8)).save(query / "20000001_sd003c05_0010.jpeg", format="JPEG")
  builder = datasets.get_builder("gta_synthreid", str(tmp_path / "data"), str(manual))
  image = datasets.decode_image(records(builder, "query")[0]["image"])
  assert image.shape == (6, 4, 3) and image.dtype == np.uint8



# --- MSMT17 -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def msmt17_builder(tmp_path_factory):
  manual = fakes.make_msmt17(str(tmp_path_factory.mktemp("msmt17_manual")))
  return datasets.get_builder("msmt17", str(tmp_path_factory.mktemp("msmt17_data")), manual)


def test_msmt17_train_split_is_list_train_alone_as_torchreid(msmt17_builder):
  """torchreid's train split (list_val joins only with combineall): the summary counts list_train alone."""
  summary = datasets.summarize(msmt17_builder)
  assert summary == fakes.MSMT17_EXPECTED
  assert summary["train"]["images"] == len(fakes.MSMT17_LISTS["list_train.txt"]) == 6
  val = records(msmt17_builder, "val")
  pids, camids = [r["pid"] for r in val], [r["camid"] for r in val]
  assert parsing.split_summary(pids, camids) == fakes.MSMT17_VAL_EXPECTED
  listed = fakes.MSMT17_LISTS["list_val.txt"]
  assert [r["filename"] for r in val] == sorted(os.path.basename(p) for p, _ in listed)


def test_msmt17_records_take_pid_from_the_list_and_camera_from_the_name(msmt17_builder):
  train = records(msmt17_builder, "train")
  listed = fakes.MSMT17_LISTS["list_train.txt"]
  assert [r["filename"] for r in train] == sorted(os.path.basename(p) for p, _ in listed)  # unlisted skipped
  by_name = {r["filename"]: r for r in train}
  record = by_name["0001_000_15_0113afternoon_0200_0.jpg"]
  assert (record["pid"], record["camid"]) == (1, 14)
  assert datasets.decode_image(record["image"]).shape == (*fakes.IMAGE_SIZE, 3)
  gallery = records(msmt17_builder, "gallery")
  assert {r["pid"] for r in gallery} == {0, 1, 2}  # test identities restart at 0, as in the release


@pytest.mark.parametrize("version, base", [("MSMT17_V2", "msmt17"), ("MSMT17_V1", ""), ("MSMT17_V2", "")])
def test_msmt17_versions_and_folders(version, base, tmp_path):
  manual = fakes.make_msmt17(str(tmp_path / "manual"), version=version, base=base)
  builder = datasets.get_builder("msmt17", str(tmp_path / "data"), manual)
  assert datasets.summarize(builder) == fakes.MSMT17_EXPECTED


def test_msmt17_prefers_v1_as_torchreid(tmp_path):
  manual = fakes.make_msmt17(str(tmp_path / "manual"), version="MSMT17_V2")
  fakes.make_msmt17(manual, version="MSMT17_V1")
  os.remove(os.path.join(manual, "msmt17", "MSMT17_V2", "list_query.txt"))  # V2 would fail if it were read
  builder = datasets.get_builder("msmt17", str(tmp_path / "data"), manual)
  assert datasets.summarize(builder) == fakes.MSMT17_EXPECTED


def test_msmt17_cli_json(tmp_path, capsys):
  manual = fakes.make_msmt17(str(tmp_path / "manual"))
  assert cli.main(["msmt17", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'data'}", "--json"]) == 0
  assert json.loads(capsys.readouterr().out) == fakes.MSMT17_EXPECTED


def _msmt17_release(tmp_path):
  manual = fakes.make_msmt17(str(tmp_path / "manual"))
  return manual, os.path.join(manual, "msmt17", "MSMT17_V1")


def test_msmt17_missing_release_shows_the_layout(tmp_path):
  manual = fakes.make_dukemtmc_reid(str(tmp_path / "manual"))
  with pytest.raises(FileNotFoundError, match="no MSMT17 release folder") as e:
    datasets.get_builder("msmt17", str(tmp_path / "data"), manual)
  message = str(e.value)
  assert "msmt17/MSMT17_V1/train/0000/0000_000_01_0303morning_0015_0.jpg" in message
  assert "msmt17/MSMT17_V1/{list_train.txt,list_val.txt,list_query.txt,list_gallery.txt}" in message
  assert "mask_train_v2" in message and "datasets/msmt17.md" in message


def test_msmt17_missing_list_file_is_named(tmp_path):
  manual, release = _msmt17_release(tmp_path)
  os.remove(os.path.join(release, "list_val.txt"))
  with pytest.raises(FileNotFoundError, match=r"missing list file .*MSMT17_V1/list_val.txt.*copy them"):
    datasets.get_builder("msmt17", str(tmp_path / "data"), manual)


def test_msmt17_missing_image_folder_is_named(tmp_path):
  manual, release = _msmt17_release(tmp_path)
  shutil.rmtree(os.path.join(release, "test"))
  with pytest.raises(FileNotFoundError, match=r"missing folder .*MSMT17_V1/test \(the test images"):
    datasets.get_builder("msmt17", str(tmp_path / "data"), manual)


@pytest.mark.parametrize(
    "line, message",
    [
        ("0000/0000_003_01_0113morning_0030_0.jpg", r"cannot parse line 4 of .*list_query.txt"),
        ("0000/0000_003_01_0113morning_0030_0.jpg zero", r"cannot parse line 4 of .*list_query.txt"),
        ("0000/person.jpg 0", r"cannot parse the camera of 0000/person.jpg \(line 4 of .*list_query.txt"),
        ("0000/0000_003_16_0113morning_0030_0.jpg 0", r"camera 16 of .* is outside 1..15"),
        ("0000/0000_000_01_0113morning_0008_0.jpg 0", r"listed twice in split 'query' \(line 1 of .*line 4"),
    ],
)
def test_msmt17_bad_list_lines_are_named(line, message, tmp_path):
  manual, release = _msmt17_release(tmp_path)
  with open(os.path.join(release, "list_query.txt"), "a") as f:
    f.write(line + "\n")
  with pytest.raises(ValueError, match=message):
    datasets.get_builder("msmt17", str(tmp_path / "data"), manual)


def test_msmt17_image_in_list_train_and_list_val_is_named(tmp_path):
  """train and val may be merged (combineall): an image in both lists would train twice."""
  manual, release = _msmt17_release(tmp_path)
  with open(os.path.join(release, "list_val.txt"), "a") as f:
    f.write("0000/0000_000_01_0303morning_0015_0.jpg 0\n")
  with pytest.raises(ValueError, match=r"twice in split 'val' \(line 1 of .*list_train.txt and line 3 "):
    datasets.get_builder("msmt17", str(tmp_path / "data"), manual)


def test_msmt17_listed_image_that_does_not_exist(tmp_path):
  manual, release = _msmt17_release(tmp_path)
  missing = fakes.MSMT17_LISTS["list_gallery.txt"][2][0]
  os.remove(os.path.join(release, "test", missing))
  with pytest.raises(FileNotFoundError, match=rf"{missing} \(line 3 of .*list_gallery.txt\) does not exist"):
    datasets.get_builder("msmt17", str(tmp_path / "data"), manual)
  assert not builders.Msmt17(data_dir=str(tmp_path / "data")).is_prepared()


def test_msmt17_v1_lists_with_v2_images(tmp_path):
  manual = fakes.make_msmt17(str(tmp_path / "manual"), version="MSMT17_V2")
  release = os.path.join(manual, "msmt17", "MSMT17_V2")
  with open(os.path.join(release, "list_train.txt"), "a") as f:
    f.write("0009/0009_000_01_0303morning_0001_0.jpg 9\n")
  with pytest.raises(FileNotFoundError, match=r"mask_train_v2/0009/0009_000_01.*V1 lists go with train/"):
    datasets.get_builder("msmt17", str(tmp_path / "data"), manual)


def test_two_images_of_one_name_in_a_split_are_named(tmp_path):
  a, b = (parsing.Sample(str(tmp_path / d / "0001_c1_1.png"), 1, 0, "0001_c1_1.png") for d in ("a", "b"))
  with pytest.raises(ValueError, match=r"cuhk03/labeled: split 'train' holds two images named 0001_c1_1.png"):
    builders.in_file_name_order("cuhk03/labeled", "train", [a, b])


def test_large_splits_are_written_in_order_over_several_shards(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, "SHARD_BYTES", 1)  # one image per shard
  manual = fakes.make_msmt17(str(tmp_path / "manual"))
  builder = datasets.get_builder("msmt17", str(tmp_path / "data"), manual)
  assert builder.info.splits["gallery"].num_shards == fakes.MSMT17_EXPECTED["gallery"]["images"]
  gallery = [r["filename"] for r in records(builder, "gallery")]
  assert gallery == sorted(os.path.basename(p) for p, _ in fakes.MSMT17_LISTS["list_gallery.txt"])
  assert datasets.summarize(builder) == fakes.MSMT17_EXPECTED

# --- Errors -------------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_valid_names(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'market'") as e:
    datasets.get_builder("market", str(tmp_path))
  assert all(name in str(e.value) for name in datasets.DATASET_NAMES)


@pytest.mark.parametrize("other", [None, "DukeMTMC-reID"])
def test_missing_dataset_folder_says_where_and_what(other, tmp_path):
  (tmp_path / "manual").mkdir()
  if other:  # manual_dir holds another dataset only
    fakes.make_dukemtmc_reid(str(tmp_path / "manual"))
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_builder("market1501", str(tmp_path / "data"), str(tmp_path / "manual"))
  message = str(e.value)
  assert "Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_03.jpg" in message
  assert "datasets/market1501.md" in message


def test_missing_split_folder_is_named(tmp_path):
  manual = fakes.make_dukemtmc_reid(str(tmp_path / "manual"))
  shutil.rmtree(os.path.join(manual, "DukeMTMC-reID", "query"))
  with pytest.raises(FileNotFoundError, match=r"DukeMTMC-reID/query \(the 'query' split\)"):
    datasets.get_builder("dukemtmc_reid", str(tmp_path / "data"), manual)


def test_missing_or_absent_manual_dir(tmp_path):
  with pytest.raises(ValueError, match="no manual_dir was given.*datasets/gta_synthreid.md"):
    datasets.get_builder("gta_synthreid", str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError, match="manual_dir .*nowhere does not exist or is empty"):
    datasets.get_builder("gta_synthreid", str(tmp_path / "data"), str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "name, message",
    [
        ("person_c1s1_000451_03.jpg", "cannot parse identity and camera from file name .*person_c1s1"),
        ("0002_c7s1_000451_03.jpg", "camera 7 of .*0002_c7s1_000451_03.jpg is outside 1..6"),
        ("1502_c1s1_000451_03.jpg", "identity 1502 of .*1502_c1s1_000451_03.jpg is outside 0..1501"),
    ],
)
def test_bad_file_names_are_named(name, message, tmp_path):
  manual = fakes.make_market1501(str(tmp_path / "manual"))
  fakes.write_image(os.path.join(manual, "Market-1501-v15.09.15", "bounding_box_train", name))
  with pytest.raises(ValueError, match=message):
    datasets.get_builder("market1501", str(tmp_path / "data"), manual)


def test_unreadable_image_is_named(tmp_path):
  manual = fakes.make_market1501(str(tmp_path / "manual"))
  broken = os.path.join(manual, "Market-1501-v15.09.15", "query", "0009_c1s1_000001_00.jpg")
  fakes.write_broken_image(broken)
  with pytest.raises(ValueError, match=f"cannot read image {broken}"):
    datasets.get_builder("market1501", str(tmp_path / "data"), manual)
  assert not builders.Market1501(data_dir=str(tmp_path / "data")).is_prepared()


def test_split_of_only_junk_is_empty(tmp_path):
  manual = tmp_path / "manual"
  fakes.write_tree(str(manual / "Market-1501-v15.09.15"),
                   {**fakes.MARKET_FILES, "query": ["-1_c1s1_000001_00.jpg"]})
  with pytest.raises(ValueError, match="split 'query' is empty"):
    datasets.get_builder("market1501", str(tmp_path / "data"), str(manual))


def test_cuhk03_release_without_protocol_file(tmp_path):
  manual = fakes.make_cuhk03_release(str(tmp_path / "manual"))
  os.remove(os.path.join(manual, "cuhk03", "cuhk03_new_protocol_config_detected.mat"))
  with pytest.raises(FileNotFoundError, match="cuhk03_new_protocol_config_detected.mat"):
    datasets.get_builder("cuhk03/detected", str(tmp_path / "data"), manual)


def test_cuhk03_neither_route(tmp_path):
  manual = fakes.make_cuhk03_np(str(tmp_path / "manual"), image_types=("detected",))
  with pytest.raises(FileNotFoundError, match="neither the cuhk03-np folders nor the original release") as e:
    datasets.get_builder("cuhk03/labeled", str(tmp_path / "data"), manual)
  assert "cuhk03-np/labeled/query/0001_c1_1.png" in str(e.value) and "cuhk-03.mat" in str(e.value)


def test_decode_image_rejects_other_values():
  with pytest.raises(TypeError, match="got str"):
    datasets.decode_image("image.jpg")
  grey = io.BytesIO()
  Image.fromarray(np.zeros((3, 2), np.uint8)).save(grey, format="PNG")
  assert datasets.decode_image(grey.getvalue()).shape == (3, 2, 3)
  assert datasets.decode_image(np.zeros((3, 2, 1), np.uint8)).shape == (3, 2, 3)


# --- reid_toy -----------------------------------------------------------------------------------------------


def test_toy_is_deterministic_and_seeded(tiny_toy_config, tmp_path):
  first = pathlib.Path(toy.write_domain(tiny_toy_config, "real", str(tmp_path / "a")))
  second = pathlib.Path(toy.write_domain(tiny_toy_config, "real", str(tmp_path / "b")))
  for folder in parsing.SPLIT_FOLDERS.values():
    names = sorted(os.listdir(first / folder))
    assert names == sorted(os.listdir(second / folder))
    for name in names:
      assert (first / folder / name).read_bytes() == (second / folder / name).read_bytes()
  reseeded = toy.render_domain(dataclasses.replace(tiny_toy_config, seed=1), "real")[0]
  assert not np.array_equal(reseeded, toy.render_domain(tiny_toy_config, "real")[0])


@pytest.mark.parametrize("domain", toy.DOMAINS)
def test_toy_builds_with_disjoint_identities(domain, tiny_toy_config, tmp_path):
  c = tiny_toy_config
  builder = datasets.get_builder(f"reid_toy/{domain}", str(tmp_path), toy_config=c)
  n_test = c.num_test_ids * c.images_per_id
  assert datasets.summarize(builder) == {
      "train": {"ids": c.num_train_ids, "images": c.num_train_ids * c.images_per_id,
                "cameras": c.num_cameras},
      "query": {"ids": c.num_test_ids, "images": c.num_test_ids * c.queries_per_id,
                "cameras": len({r["camid"] for r in records(builder, "query")})},
      "gallery": {"ids": c.num_test_ids, "images": n_test - c.num_test_ids * c.queries_per_id,
                  "cameras": c.num_cameras},
  }
  train, query, gallery = (records(builder, s) for s in parsing.SPLITS)
  assert not {r["pid"] for r in train} & {r["pid"] for r in query + gallery}
  for q in query:  # every query has a true match in another camera (Market protocol)
    assert any(g["pid"] == q["pid"] and g["camid"] != q["camid"] for g in gallery)
  image = datasets.decode_image(train[0]["image"])
  assert image.shape == (c.height, c.width, 3)


def test_toy_gap_changes_style_not_layout(tiny_toy_config):
  c = tiny_toy_config
  flat = toy.render_domain(dataclasses.replace(c, gap=0.0), "real")[0]
  real = toy.render_domain(c, "real")[0].astype(np.float32)
  synthetic = toy.render_domain(c, "synthetic")[0]
  # gap 0 leaves flat shading: few distinct colours per image, like the synthetic domain.
  n_colours = lambda images: np.mean([len(np.unique(i.reshape(-1, 3), axis=0)) for i in images])
  assert n_colours(flat) < 40 and n_colours(synthetic) < 40 and n_colours(real) > 500
  # The same people in the same poses: the real render still correlates strongly with the flat one.
  grey = lambda x: x.astype(np.float32).mean(-1).reshape(len(x), -1)
  a, b = grey(flat), grey(real)
  a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
  corr = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
  assert np.median(corr) > 0.6
  assert np.abs(real - flat).mean() > 10  # yet clearly a different look


def test_toy_rebuilds_when_its_config_changes(tiny_toy_config, tmp_path):
  builder = datasets.get_builder("reid_toy/synthetic", str(tmp_path), toy_config=tiny_toy_config)
  assert builder.info.metadata["toy_config"] == tiny_toy_config.to_json()
  smaller = dataclasses.replace(tiny_toy_config, num_train_ids=2)
  rebuilt = datasets.get_builder("reid_toy/synthetic", str(tmp_path), toy_config=smaller)
  assert datasets.summarize(rebuilt)["train"]["ids"] == 2
  assert pickle.loads(pickle.dumps(rebuilt)).toy_config == smaller


def test_toy_rebuilds_when_its_rendering_changes(tiny_toy_config, tmp_path, monkeypatch):
  builder = datasets.get_builder("reid_toy/synthetic", str(tmp_path), toy_config=tiny_toy_config)
  assert builder.info.metadata["toy_config"]["render_version"] == toy.RENDER_VERSION
  monkeypatch.setattr(toy, "RENDER_VERSION", toy.RENDER_VERSION + 1)
  rebuilt = datasets.get_builder("reid_toy/synthetic", str(tmp_path), toy_config=tiny_toy_config)
  assert rebuilt.info.metadata["toy_config"]["render_version"] == toy.RENDER_VERSION
  images_dirs = list((tmp_path / "downloads" / "reid_toy").iterdir())
  assert len(images_dirs) == 2  # the images of each rendering version are kept apart


def test_toy_config_rejects_impossible_splits():
  with pytest.raises(ValueError, match="queries_per_id=4 leaves no gallery image"):
    toy.ToyConfig(images_per_id=4, queries_per_id=4)
  with pytest.raises(ValueError, match="queries_per_id=3 must be below num_cameras=3"):
    toy.ToyConfig(num_cameras=3, queries_per_id=3)


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_json_is_the_only_stdout(fake_manual_dir, fake_data_dir, capsys):
  args = ["market1501", f"--manual_dir={fake_manual_dir}", f"--data_dir={fake_data_dir}", "--json"]
  assert cli.main(args) == 0
  assert json.loads(capsys.readouterr().out) == fakes.MARKET_EXPECTED


def test_cli_table_and_errors(fake_manual_dir, fake_data_dir, capsys):
  assert cli.main(["dukemtmc_reid", f"--manual_dir={fake_manual_dir}", f"--data_dir={fake_data_dir}"]) == 0
  out = capsys.readouterr().out
  assert "subset   | # ids | # images | # cameras" in out
  assert "  gallery  |     4 |        6 |         6" in out
  assert cli.main(["duke", f"--data_dir={fake_data_dir}", "--json"]) == 1
  captured = capsys.readouterr()
  assert captured.out == "" and "choose one of" in captured.err


def test_cli_subprocess_prints_json_only(fake_manual_dir, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.dirname(datasets.__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run(
      [sys.executable, "-m", "synth_reid_jax.datasets", "cuhk03/detected", f"--manual_dir={fake_manual_dir}",
       f"--data_dir={tmp_path}", "--json"],
      capture_output=True, text=True, env=env, check=True,
  )
  assert json.loads(result.stdout) == fakes.CUHK03_NP_EXPECTED
