"""Input pipelines: source set building, epoch streams, sharding, resuming, padded evaluation, PK batches."""

import io

import numpy as np
import pytest
from PIL import Image

from configs import default as default_config
from synth_reid_jax import input_pipeline, transforms
from synth_reid_jax.errors import UserError

HEIGHT, WIDTH = 16, 8
# Fake source splits: pid -> number of images. pid 0 in the gallery plays Market's distractor.
TRAIN_IDS = {3: 30, 5: 2, 9: 12, 11: 4}
QUERY_IDS = {20: 1, 21: 2}
GALLERY_IDS = {20: 25, 21: 3, 0: 2}


def _png(image_id: int, split_code: int) -> bytes:
  """A solid-colour image whose colour survives resizes, crops and flips: it names the image."""
  colour = (image_id % 256, image_id // 256, 40 * split_code)
  buffer = io.BytesIO()
  Image.fromarray(np.full((12, 6, 3), colour, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def _split(ids: dict, split_code: int, first_id: int) -> list:
  pids = [pid for pid, count in ids.items() for _ in range(count)]
  return [{"image": _png(first_id + i, split_code), "pid": pid, "camid": i % 3,
           "filename": f"{pid:04d}_{i}.png"} for i, pid in enumerate(pids)]


def _sources():
  train = _split(TRAIN_IDS, 0, 0)
  query = _split(QUERY_IDS, 1, len(train))
  gallery = _split(GALLERY_IDS, 2, len(train) + len(query))
  return {"train": train, "query": query, "gallery": gallery}


SOURCES = _sources()


def _image_ids(images: np.ndarray) -> np.ndarray:
  """Recover the image id from normalised (mean = std = 0.5) solid-colour images."""
  pixels = np.rint((images[:, 0, 0, :2] * 0.5 + 0.5) * 255).astype(np.int64)
  return pixels[:, 0] + 256 * pixels[:, 1]


def _pid_of_id():
  table = {}
  for split in ("train", "query", "gallery"):
    for record in SOURCES[split]:
      r, g, _ = np.asarray(Image.open(io.BytesIO(record["image"])))[0, 0].astype(int)
      table[r + 256 * g] = (split, record["pid"])
  return table


PID_OF_ID = _pid_of_id()


def _config(**data):
  config = default_config.get_config()
  config.data.height, config.data.width = HEIGHT, WIDTH
  config.data.source = "gta_synthreid"
  config.data.n_samples = 10
  config.data.num_workers = 0
  config.train.batch_size = 4
  config.eval.batch_size = 4
  for key, value in data.items():
    config.data[key] = value
  return config


def _source(config, process_index=0, process_count=1, sources=SOURCES):
  return input_pipeline.create_source_pipeline(config, process_index, process_count, data_sources=sources)


def _take(stream, n):
  return [next(stream.iterator) for _ in range(n)]


# --- The example table ------------------------------------------------------------------------------


def _labels():
  return {split: input_pipeline.read_labels(records) for split, records in SOURCES.items()}


def test_read_labels():
  labels = input_pipeline.read_labels(SOURCES["query"])
  assert labels.pids.tolist() == [20, 21, 21] and labels.camids.tolist() == [0, 1, 2]
  assert labels.filenames.tolist() == ["0020_0.png", "0021_1.png", "0021_2.png"] and len(labels) == 3


def test_combineall_merges_train_and_gallery_and_relabels():
  assert input_pipeline.source_splits(False) == ("train",)
  assert input_pipeline.source_splits(True) == ("train", "gallery")
  assert input_pipeline.source_splits(True, include_query=True) == ("train", "query", "gallery")
  examples = input_pipeline.build_examples(_labels(), ("train", "gallery"), 10, seed=0, distractor_pids=(0,))
  # train: 3 -> 10, 5 -> 2, 9 -> 10, 11 -> 4; gallery: 20 -> 10, 21 -> 3 (distractor 0 dropped).
  assert len(examples) == 39 and examples.num_classes == 6
  assert np.bincount(examples.labels).tolist() == [10, 2, 10, 4, 10, 3]
  labels = _labels()
  for split_index, record_index, label in zip(examples.split_index, examples.record_index, examples.labels):
    split = examples.splits[split_index]
    pid = labels[split].pids[record_index]
    expected = [3, 5, 9, 11].index(pid) if split == "train" else 4 + [20, 21].index(pid)
    assert label == expected
  with_distractors = input_pipeline.build_examples(_labels(), ("train", "gallery"), 10, seed=0)
  assert with_distractors.num_classes == 7 and len(with_distractors) == 41


def test_test_identities_get_new_labels_even_when_a_pid_repeats_in_train():
  def split_labels(pids):
    n = len(pids)
    return input_pipeline.SplitLabels(np.array(pids), np.zeros(n, np.int32), np.array([""] * n))
  labels = {"train": split_labels([7, 7]), "gallery": split_labels([7])}
  examples = input_pipeline.build_examples(labels, ("train", "gallery"), 0, seed=0)
  assert examples.labels.tolist() == [0, 0, 1]


def test_n_samples_cap_is_seeded():
  def kept(seed, n_samples=10):
    examples = input_pipeline.build_examples(_labels(), ("train",), n_samples, seed=seed)
    return examples.record_index.tolist()
  assert kept(0) == kept(0)
  assert kept(0) != kept(1)
  assert kept(0) == sorted(kept(0))
  assert len(kept(0, n_samples=0)) == sum(TRAIN_IDS.values())
  with pytest.raises(ValueError, match="n_samples"):
    kept(0, n_samples=-1)


# --- Source and target streams ----------------------------------------------------------------------


def test_source_stream_shapes_counts_and_labels():
  stream = _source(_config())
  assert (stream.num_images, stream.num_classes) == (39 + 2, 7)  # gta_synthreid keeps pid 0
  assert stream.steps_per_epoch == 41 // 4 and stream.batch_size == stream.global_batch_size == 4
  batch = next(stream.iterator)
  assert batch["image"].shape == (4, HEIGHT, WIDTH, 3) and batch["image"].dtype == np.float32
  assert batch["pid"].dtype == np.int32 and set(batch) == {"image", "pid"}
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_market_distractors_are_left_out_of_combineall():
  assert _source(_config(source="market1501")).num_classes == 6


def test_epochs_cover_distinct_images_and_reshuffle():
  config = _config()
  stream = _source(config)
  steps = stream.steps_per_epoch
  batches = _take(stream, 2 * steps)
  ids = np.stack([_image_ids(b["image"]) for b in batches])
  epochs = [ids[:steps].reshape(-1), ids[steps:].reshape(-1)]
  for ids in epochs:
    assert len(set(ids.tolist())) == steps * 4  # no image twice within an epoch
  assert epochs[0].tolist() != epochs[1].tolist()
  # Every pid is the relabelled identity of the image it comes with.
  train_pids, test_pids = sorted(TRAIN_IDS), sorted(GALLERY_IDS)
  for batch in batches:
    for image_id, label in zip(_image_ids(batch["image"]), batch["pid"]):
      split, pid = PID_OF_ID[int(image_id)]
      assert split in ("train", "gallery")
      assert label == (train_pids.index(pid) if split == "train" else len(train_pids) + test_pids.index(pid))


def test_stream_is_deterministic_for_a_seed():
  config = _config()
  first, second = _take(_source(config), 5), _take(_source(config), 5)
  for a, b in zip(first, second):
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["pid"], b["pid"])
  config.seed += 1
  other = _take(_source(config), 5)
  assert any(not np.array_equal(a["pid"], b["pid"]) for a, b in zip(first, other))


def test_augmentation_flips_and_crops_by_stream_position():
  config = _config(n_samples=0, combineall=False)
  picture = np.tile((np.arange(6, dtype=np.uint8) * 40)[None, :, None], (12, 1, 3))
  records = [{"image": picture, "pid": p, "camid": 0, "filename": ""} for p in range(8)]
  images = np.concatenate([b["image"] for b in _take(_source(config, sources={"train": records}), 25)])
  plain = transforms.normalize(np.asarray(Image.fromarray(picture).resize((WIDTH, HEIGHT), Image.BILINEAR)),
                               config.data.mean, config.data.std)
  is_plain = [np.array_equal(img, plain) for img in images]
  is_mirror = [np.array_equal(img, plain[:, ::-1]) for img in images]
  assert any(is_plain) and any(is_mirror)
  assert not all(p or m for p, m in zip(is_plain, is_mirror))  # some are crops of the enlarged picture
  # Roughly half are crops (crop_prob 0.5): neither the picture nor its mirror.
  assert 0.25 < 1 - np.mean(np.logical_or(is_plain, is_mirror)) < 0.75


def test_processes_read_disjoint_shards_of_the_same_global_batches():
  config = _config()
  whole = _take(_source(config), 12)
  shards = [_take(_source(config, p, 2), 12) for p in range(2)]
  for k, batch in enumerate(whole):
    assert shards[0][k]["image"].shape[0] == 2
    for key in ("image", "pid"):
      assert np.array_equal(np.concatenate([shards[0][k][key], shards[1][k][key]]), batch[key])
    ids = [set(_image_ids(shards[p][k]["image"]).tolist()) for p in range(2)]
    assert not ids[0] & ids[1]


def test_iterator_state_resumes_the_same_stream():
  config = _config()
  stream = _source(config)
  _take(stream, 7)
  state = stream.iterator.get_state()
  assert state == {"step": 7}
  expected = _take(stream, 5)
  resumed = _source(config)
  resumed.iterator.set_state(state)
  for a, b in zip(_take(resumed, 5), expected):
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["pid"], b["pid"])
  with pytest.raises(ValueError, match="step"):
    resumed.iterator.set_state({"next_index": 3})


def test_worker_processes_give_the_same_stream_and_state():
  config = _config()
  expected = _take(_source(config), 6)
  config.data.num_workers = 2
  stream = _source(config)
  try:
    stream.iterator.set_state({"step": 2})
    for a, b in zip(_take(stream, 4), expected[2:]):
      assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["pid"], b["pid"])
    assert stream.iterator.get_state() == {"step": 6}
  finally:
    stream.iterator.close()


def test_target_stream_is_unlabelled_train_images():
  config = _config()
  stream = input_pipeline.create_target_pipeline(config, 0, 1, data_sources=SOURCES)
  assert stream.num_images == sum(TRAIN_IDS.values()) and stream.num_classes == 0
  batch = next(stream.iterator)
  assert set(batch) == {"image"} and batch["image"].shape == (4, HEIGHT, WIDTH, 3)
  ids = np.concatenate([_image_ids(b["image"]) for b in _take(stream, 5)])
  assert all(PID_OF_ID[int(i)][0] == "train" for i in ids)
  # The target draws from its own seed: it is not the source's order.
  source = _source(_config(combineall=False, n_samples=0))
  assert not np.array_equal(_image_ids(next(source.iterator)["image"]), _image_ids(batch["image"]))


# --- PK sampler --------------------------------------------------------------------------------------


def test_pk_batches_hold_p_identities_of_k_images():
  config = _config(sampler="pk", num_instances=2)
  config.train.batch_size = 6
  stream = _source(config)
  for batch in _take(stream, 2 * stream.steps_per_epoch):
    counts = np.unique(batch["pid"], return_counts=True)[1]
    assert len(counts) == 3 and (counts == 2).all()


def test_pk_order_is_torchreid_identity_sampling():
  labels = np.repeat(np.arange(5), [1, 4, 4, 7, 2])
  order = input_pipeline.pk_order(labels, num_instances=2, batch_size=4, rng=np.random.default_rng(0))
  assert len(order) % 4 == 0 and len(order) > 0
  for batch in order.reshape(-1, 4):
    assert len(set(labels[batch[:2]].tolist())) == 1 and len(set(labels[batch[2:]].tolist())) == 1
    assert labels[batch[0]] != labels[batch[2]]
  orders = input_pipeline.EpochOrders(labels, 12, seed=0, sampler="pk", num_instances=2, batch_size=4)
  assert len(orders(0)) == 12 and not np.array_equal(orders(0), orders(1))


# --- Evaluation ---------------------------------------------------------------------------------------


def test_eval_batches_pad_and_mask_so_each_image_counts_once():
  config = _config()
  gallery = SOURCES["gallery"]
  labels = input_pipeline.read_labels(gallery)
  seen = []
  for process in range(2):
    stream = input_pipeline.create_eval_pipeline(config, "fake", "gallery", 4, process, 2, records=gallery)
    assert len(stream) == 8 and stream.num_images == 30 and stream.batch_size == 2  # ceil(30 / 4) batches
    batches = list(stream)
    assert len(batches) == 8
    for batch in batches:
      assert batch["image"].shape == (2, HEIGHT, WIDTH, 3) and batch["mask"].dtype == bool
      index = batch["index"][batch["mask"]]
      assert np.array_equal(batch["pid"][batch["mask"]], labels.pids[index])
      assert np.array_equal(batch["camid"][batch["mask"]], labels.camids[index])
      assert (batch["index"][~batch["mask"]] == -1).all() and (batch["pid"][~batch["mask"]] == -1).all()
      seen.extend(index.tolist())
  assert sorted(seen) == list(range(30))


def test_eval_batches_follow_record_order_unaugmented():
  config = _config()
  query = SOURCES["query"]
  stream = input_pipeline.create_eval_pipeline(config, "fake", "query", 2, 0, 1, records=query)
  batches = list(stream)
  assert [b["index"].tolist() for b in batches] == [[0, 1], [2, -1]]
  assert stream.labels.filenames.tolist()[0] == "0020_0.png"
  reference = np.asarray(Image.open(io.BytesIO(query[1]["image"])).resize((WIDTH, HEIGHT), Image.BILINEAR))
  expected = transforms.normalize(reference, config.data.mean, config.data.std)
  assert np.array_equal(batches[0]["image"][1], expected)


# --- Errors ----------------------------------------------------------------------------------------


def test_clear_errors():
  config = _config()
  config.train.batch_size = 5
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    _source(config, 0, 2)
  with pytest.raises(ValueError, match="process_index 2"):
    _source(_config(), 2, 2)
  with pytest.raises(ValueError, match="is empty"):
    _source(_config(combineall=False), sources={"train": []})
  with pytest.raises(ValueError, match="has no split 'gallery'"):
    _source(_config(), sources={"train": SOURCES["train"]})
  with pytest.raises(ValueError, match="Unknown sampler 'balanced'"):
    _source(_config(sampler="balanced"))
  with pytest.raises(ValueError, match="num_instances"):
    _source(_config(sampler="pk", num_instances=3))
  config = _config(combineall=False)
  config.train.batch_size = 1000
  with pytest.raises(ValueError, match="fewer than one global batch"):
    _source(config)
  with pytest.raises(ValueError, match="evaluation batch size"):
    input_pipeline.create_eval_pipeline(_config(), "fake", "query", 3, 0, 2, records=SOURCES["query"])
  with pytest.raises(ValueError, match="is empty"):
    input_pipeline.create_eval_pipeline(_config(), "fake", "query", 2, 0, 1, records=[])


# --- The real builders -----------------------------------------------------------------------------


def test_reid_toy_source_and_eval(tmp_path_factory):
  config = _config(source="reid_toy/synthetic", n_samples=3)
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  stream = input_pipeline.create_source_pipeline(config, 0, 1)
  assert stream.num_classes > 0 and stream.num_images <= 3 * stream.num_classes
  batch = next(stream.iterator)
  assert batch["image"].shape == (4, HEIGHT, WIDTH, 3) and (batch["pid"] < stream.num_classes).all()
  query = input_pipeline.create_eval_pipeline(config, "reid_toy/synthetic", "query", 8, 0, 1)
  seen = np.concatenate([b["index"][b["mask"]] for b in query])
  assert np.array_equal(seen, np.arange(query.num_images))


# --- random_erase in the batch ------------------------------------------------------------------------


def test_random_erase_paints_rectangles_of_the_mean_after_normalisation():
  config = _config(transforms=("random_erase",))
  batches = _take(_source(config), 20)
  assert all(set(b) == {"image", "pid"} for b in batches)  # the rectangles do not reach the trainer
  images = np.concatenate([b["image"] for b in batches])
  # The fake images are solid colours that never normalise to 0.5: erased pixels are exactly data.mean.
  erased = (images == np.float32(0.5)).all(-1)
  fraction = erased.reshape(len(images), -1).any(-1).mean()
  assert 0.3 < fraction < 0.7
  for mask in erased[erased.reshape(len(images), -1).any(-1)]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert mask.sum() == len(rows) * len(cols)  # one rectangle
    assert len(rows) < HEIGHT and len(cols) < WIDTH


# --- Validation split (the original's data.val and adversarial adv_val) ---------------------------------


def _val(config, sources=SOURCES):
  return input_pipeline.create_val_pipelines(config, 4, 0, 1, data_sources=sources)


def _val_config(**data):
  """Validation without a target (the baseline's): source identities are held out."""
  return _config(**{"val": True, "val_ids": 2, "target": "", **data})


def _target_stream(config, sources=SOURCES):
  return input_pipeline.create_target_pipeline(config, 0, 1, data_sources=sources)


def _stream_images(stream, epochs=2):
  """(split, pid) of every image the stream gives in `epochs` epochs."""
  batches = _take(stream, epochs * stream.steps_per_epoch)
  return [PID_OF_ID[int(i)] for b in batches for i in _image_ids(b["image"])]


def test_method_val_holds_out_target_identities_and_keeps_the_source_whole():
  """With a target (the method), data.val is the original's adv_val: val_ids identities of the target's train
  split leave the target stream and are the validation set; the source trains on everything."""
  config = _config(val=True, val_ids=2)  # target dukemtmc_reid (default.py), read here from SOURCES
  assert input_pipeline.val_dataset(config) == "dukemtmc_reid"
  assert input_pipeline.val_name(config) == "dukemtmc_reid-val"
  val = _val(config)
  val_pids = sorted(set(val["gallery"].labels.pids.tolist()))
  assert len(val_pids) == 2 and set(val_pids) <= set(TRAIN_IDS)
  held_out_images = sum(TRAIN_IDS[p] for p in val_pids)  # every image: n_samples is the source's
  assert val["gallery"].num_images == held_out_images
  target = _target_stream(config)
  assert target.num_images == sum(TRAIN_IDS.values()) - held_out_images
  seen = _stream_images(target)
  assert {pid for _, pid in seen} == set(TRAIN_IDS) - set(val_pids)  # held-out identities never train
  whole = _source(_config())
  source = _source(config)
  assert (source.num_images, source.num_classes) == (whole.num_images, whole.num_classes) == (41, 7)
  # The draw is the target's, one per seed; without data.val the target keeps every image.
  assert _target_stream(_config()).num_images == sum(TRAIN_IDS.values())
  def drawn(seed):
    config = _config(val=True, val_ids=2)
    config.seed = seed
    return tuple(sorted(set(_val(config)["gallery"].labels.pids.tolist())))
  assert drawn(10) == tuple(val_pids) and len({drawn(seed) for seed in range(6)}) > 1


def test_val_identities_are_held_out_of_training_and_form_the_val_gallery():
  config = _val_config()
  assert input_pipeline.val_name(config) == "gta_synthreid-val"
  val = _val(config)
  val_pids = sorted(set(val["gallery"].labels.pids.tolist()))
  assert len(val_pids) == 2 and set(val_pids) <= set(TRAIN_IDS)
  stream = _source(config)
  # combineall: 4 + 2 gallery identities (pid 0 kept for GTA) less the 2 held out; images 41 less theirs.
  held_out_images = sum(min(TRAIN_IDS[p], 10) for p in val_pids)
  assert stream.num_classes == 7 - 2 and stream.num_images == 41 - held_out_images
  assert val["gallery"].num_images == held_out_images
  seen_labels = set()
  trained = sorted(set(TRAIN_IDS) - set(val_pids))
  for batch in _take(stream, 3 * stream.steps_per_epoch):
    for image_id, label in zip(_image_ids(batch["image"]), batch["pid"]):
      split, pid = PID_OF_ID[int(image_id)]
      assert not (split == "train" and pid in val_pids)
      if split == "train":
        assert label == trained.index(pid)  # the rest relabelled 0..N-1
      seen_labels.add(int(label))
  assert seen_labels == set(range(stream.num_classes))


def test_val_gallery_is_the_complement_of_the_trained_train_images():
  for combineall in (False, True):
    config = _val_config(combineall=combineall)
    labels = {s: input_pipeline.read_labels(SOURCES[s]) for s in ("train", "gallery")}
    splits = input_pipeline.source_splits(combineall)
    seed = input_pipeline._seed_for(config, input_pipeline._SOURCE_STREAM)
    everything = input_pipeline.build_examples(labels, splits, 10, seed)
    held = input_pipeline.build_examples(labels, splits, 10, seed, val_ids=2)
    train_of = lambda e: set(e.record_index[e.split_index == 0].tolist())  # noqa: E731
    assert train_of(held).isdisjoint(held.val_record_index.tolist())
    assert train_of(held) | set(held.val_record_index.tolist()) == train_of(everything)
    gallery = _val(config)["gallery"]
    expected = [SOURCES["train"][i]["filename"] for i in held.val_record_index]
    assert gallery.labels.filenames.tolist() == expected  # record order


@pytest.mark.parametrize("target", ["", "dukemtmc_reid"])
def test_val_query_is_one_image_per_camera_of_each_identity_drawn_with_the_seed(target):
  def query_of(seed):
    config = _val_config(target=target)
    config.seed = seed
    val = _val(config)
    return val["gallery"].labels, val["query"].labels

  gallery, query = query_of(10)
  pairs = set(zip(gallery.pids.tolist(), gallery.camids.tolist()))
  assert sorted(zip(query.pids.tolist(), query.camids.tolist())) == sorted(pairs)  # one per (pid, camera)
  position = {name: i for i, name in enumerate(gallery.filenames.tolist())}
  assert set(position) >= set(query.filenames.tolist())  # the query stays in the gallery, as the original's
  assert [position[name] for name in query.filenames] == sorted(position[name] for name in query.filenames)
  assert query_of(10)[1].filenames.tolist() == query.filenames.tolist()  # the same seed, the same query
  firsts = {}
  for i, pair in enumerate(zip(gallery.pids.tolist(), gallery.camids.tolist())):
    firsts.setdefault(pair, i)
  first_images = [gallery.filenames[i] for i in sorted(firsts.values())]
  assert any(query_of(seed)[1].filenames.tolist() != first_images for seed in range(4))  # not the first
  for batch in _val(_val_config(target=target))["query"]:
    mask = batch["mask"]
    assert np.array_equal(batch["pid"][mask], query.pids[batch["index"][mask]])
    assert batch["image"].shape == (4, HEIGHT, WIDTH, 3)


def test_val_query_index_draws_each_member_of_a_group():
  labels = input_pipeline.SplitLabels(np.array([5, 5, 5, 4, 5]), np.array([1, 0, 1, 0, 0], np.int32),
                                      np.array([""] * 5))
  picks = {tuple(input_pipeline.val_query_index(labels, seed).tolist()) for seed in range(20)}
  assert picks == {(0, 1, 3), (0, 3, 4), (1, 2, 3), (2, 3, 4)}  # (5, 1): 0 or 2; (5, 0): 1 or 4; (4, 0): 3


def test_val_draw_is_deterministic_per_seed():
  def drawn(seed):
    config = _val_config()
    config.seed = seed
    return sorted(set(_val(config)["gallery"].labels.pids.tolist()))
  assert drawn(0) == drawn(0)
  assert len({tuple(drawn(seed)) for seed in range(6)}) > 1
  pids = np.array([1, 1, 2, 3, 3, 4, 0])
  assert input_pipeline.draw_val_pids(pids, 2, 7, distractor_pids=(0,)).tolist() == \
      input_pipeline.draw_val_pids(pids, 2, 7, distractor_pids=(0,)).tolist()
  assert 0 not in input_pipeline.draw_val_pids(pids, 3, 7, distractor_pids=(0,))


def test_val_errors():
  with pytest.raises(UserError, match=r"val_ids=4: the train split of gta_synthreid has 4 identities .*\(at "
                                      r"most 3\) or set config.data.val=False"):
    _source(_val_config(val_ids=4))
  with pytest.raises(UserError, match=r"val_ids=200: the train split of dukemtmc_reid has 4 identities"):
    _target_stream(_config(val=True, val_ids=200))
  with pytest.raises(UserError, match="dukemtmc_reid has 4 identities"):
    _val(_config(val=True, val_ids=200))
  with pytest.raises(ValueError, match="val=True"):
    _val(_config())


# --- MSMT17's list_val (torchreid: only with combineall) -------------------------------------------------

# An MSMT17-like "val" split: more images of train identities 3 and 9 (list_val.txt).
VAL_SPLIT_IDS = {3: 2, 9: 3}
MSMT17_SOURCES = {**SOURCES, "val": _split(VAL_SPLIT_IDS, 3, 500)}


def test_msmt17_list_val_joins_only_with_combineall_or_the_key():
  assert input_pipeline.source_splits(False, extra_train=("val",)) == ("train", "val")
  assert input_pipeline.source_splits(True, extra_train=("val",)) == ("train", "val", "gallery")
  target = dict(target="msmt17", source="gta_synthreid")
  total = sum(TRAIN_IDS.values())
  assert _target_stream(_config(**target), MSMT17_SOURCES).num_images == total  # list_train alone
  joined = _config(**target, msmt17_list_val=True)
  assert _target_stream(joined, MSMT17_SOURCES).num_images == total + sum(VAL_SPLIT_IDS.values())
  source = dict(source="msmt17", n_samples=0)
  assert _source(_config(**source, combineall=False), sources=MSMT17_SOURCES).num_images == total
  merged = _source(_config(**source, combineall=True), sources=MSMT17_SOURCES)
  assert merged.num_images == total + sum(VAL_SPLIT_IDS.values()) + 30  # + gallery (no distractors here)
  assert merged.num_classes == 4 + 3  # list_val's identities are train identities


def test_held_out_identities_leave_list_val_too():
  config = _config(target="msmt17", msmt17_list_val=True, val=True, val_ids=2)
  val_pids = set(_val(config, MSMT17_SOURCES)["gallery"].labels.pids.tolist())
  stream = _target_stream(config, MSMT17_SOURCES)
  kept_val = sum(n for pid, n in VAL_SPLIT_IDS.items() if pid not in val_pids)
  assert stream.num_images == sum(n for pid, n in TRAIN_IDS.items() if pid not in val_pids) + kept_val
  examples = input_pipeline.build_examples(
      {s: input_pipeline.read_labels(MSMT17_SOURCES[s]) for s in ("train", "val")}, ("train", "val"), 0, 0,
      val_ids=2)
  val_split = MSMT17_SOURCES["val"]
  for split_index, record_index, label in zip(examples.split_index, examples.record_index, examples.labels):
    if examples.splits[split_index] == "val":
      pid = val_split[record_index]["pid"]
      assert pid not in examples.val_pids
      assert label == sorted(set(TRAIN_IDS) - set(examples.val_pids.tolist())).index(pid)  # train's label


# --- Target restarts (the original's loader re-iterated every source epoch) ----------------------------


def test_target_pass_mapping():
  # 5 source steps per epoch, target passes of 2 batches: passes (e, 0), (e, 1) and a cut (e, 2).
  mapping = [input_pipeline.target_pass(k, 5, 2) for k in range(11)]
  assert mapping == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0),
                     (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1), (1, 2, 0), (2, 0, 0)]
  # A target longer than the source epoch: every epoch starts a fresh pass and never finishes it.
  assert [input_pipeline.target_pass(k, 3, 10) for k in (2, 3, 6)] == [(0, 0, 2), (1, 0, 0), (2, 0, 0)]


TARGET_SOURCES = {"train": [{"image": _png(i, 0), "pid": 1, "camid": 0, "filename": ""} for i in range(8)]}


def _target(config, source_steps_per_epoch, process_index=0, process_count=1):
  return input_pipeline.create_target_pipeline(config, process_index, process_count,
                                               data_sources=TARGET_SOURCES,
                                               source_steps_per_epoch=source_steps_per_epoch)


def test_target_restarts_a_pass_at_each_source_epoch_and_when_it_runs_out():
  config = _config()
  stream = _target(config, source_steps_per_epoch=5)
  assert stream.steps_per_epoch == 2
  ids = [_image_ids(b["image"]).tolist() for b in _take(stream, 15)]
  for epoch in range(3):
    steps = ids[5 * epoch:5 * epoch + 5]
    assert sorted(steps[0] + steps[1]) == list(range(8))  # pass (e, 0), whole
    assert sorted(steps[2] + steps[3]) == list(range(8))  # pass (e, 1): the first ran out
    assert len(set(steps[4])) == 4  # pass (e, 2), cut by the epoch's end
  passes = [tuple(ids[k] + ids[k + 1]) for k in (0, 2, 5, 7, 10)]
  assert len(set(passes)) == len(passes)  # each pass a fresh permutation
  # Exactly the pure mapping: pass (e, p)'s order drawn from (seed, e, p).
  seed = input_pipeline._seed_for(config, input_pipeline._TARGET_STREAM)
  orders = input_pipeline.EpochOrders(np.zeros(8), 8, seed)
  for k in range(15):
    epoch, pass_index, position = input_pipeline.target_pass(k, 5, 2)
    assert ids[k] == orders((epoch, pass_index))[4 * position:4 * position + 4].tolist()


def test_target_restarts_off_or_unknown_source_epoch_is_the_continuous_stream():
  config = _config()
  continuous = [_image_ids(b["image"]).tolist() for b in _take(_target(config, None), 6)]
  assert sorted(continuous[2] + continuous[3]) == list(range(8))  # epochs of the target itself
  config.data.target_restarts = False
  off = [_image_ids(b["image"]).tolist() for b in _take(_target(config, 3), 6)]
  assert off == continuous
  restarted = [_image_ids(b["image"]).tolist() for b in _take(_target(_config(), 3), 6)]
  assert restarted != continuous
  with pytest.raises(ValueError, match="source_steps_per_epoch"):
    _target(_config(), 0)


def test_target_restarts_resume_and_shard_exactly():
  config = _config()
  expected = _take(_target(config, 5), 14)
  resumed = _target(config, 5)
  resumed.iterator.set_state({"step": 9})
  for a, b in zip(_take(resumed, 5), expected[9:]):
    assert np.array_equal(a["image"], b["image"])
  shards = [_take(_target(config, 5, p, 2), 14) for p in range(2)]
  for k, batch in enumerate(expected):
    assert np.array_equal(np.concatenate([shards[0][k]["image"], shards[1][k]["image"]]), batch["image"])
  config.data.num_workers = 2
  stream = _target(config, 5)
  try:
    stream.iterator.set_state({"step": 4})
    for a, b in zip(_take(stream, 6), expected[4:10]):
      assert np.array_equal(a["image"], b["image"])
    assert stream.iterator.get_state() == {"step": 10}
  finally:
    stream.iterator.close()
