"""Tests for tpp_jax.data.pipeline (grain iterators, eval padding, sharding)."""
import functools
import itertools

import numpy as np
import pytest
from PIL import Image

from tpp_jax.data import image_store, pipeline, sources, transforms


class _IdSource:
  """n tiny records; 'id' is passed through the transform untouched."""

  def __init__(self, n, labels=None):
    self.n = n
    self.labels = (np.arange(n, dtype=np.int32) % 2 if labels is None
                   else np.asarray(labels, np.int32))
    self.num_classes = int(self.labels.max()) + 1

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 1), i % 256, np.uint8),
            "label": self.labels[i], "id": np.int32(i)}


_TRAIN = transforms.make_transform(
    {"image_size": 4, "channels": 1, "augment": {"crop_scale": None,
                                                 "hflip": True,
                                                 "intensity": 0.2}}, train=True)
_EVAL = transforms.make_transform({"image_size": 4, "channels": 3}, train=False)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_train_batches_format_and_epochs():
  src = _IdSource(40)
  batches = _take(pipeline.train_iter(src, _TRAIN, 8, seed=0), 10)
  b = batches[0]
  assert b["image"].shape == (8, 4, 4, 1) and b["image"].dtype == np.float32
  assert b["label"].shape == (8,) and b["label"].dtype == np.int32
  ids = np.concatenate([x["id"] for x in batches])
  # Each epoch (5 batches) is a permutation; the two epochs' orders differ.
  assert sorted(ids[:40]) == list(range(40)) == sorted(ids[40:])
  assert not np.array_equal(ids[:40], ids[40:])
  assert not np.array_equal(ids[:40], np.arange(40))


def test_train_seed_determinism():
  src = _IdSource(50)
  a = _take(pipeline.train_iter(src, _TRAIN, 8, seed=3), 8)
  b = _take(pipeline.train_iter(src, _TRAIN, 8, seed=3), 8)
  c = _take(pipeline.train_iter(src, _TRAIN, 8, seed=4), 8)
  assert _same(a, b)
  assert not np.array_equal(np.concatenate([x["id"] for x in a]),
                            np.concatenate([x["id"] for x in c]))


@pytest.mark.parametrize("balance", [False, True])
def test_train_state_resume(balance):
  src = _IdSource(30)
  it = pipeline.train_iter(src, _TRAIN, 8, seed=1, balance=balance)
  _take(it, 5)  # crosses an epoch boundary
  state = it.get_state()
  expected = _take(it, 6)
  fresh = pipeline.train_iter(src, _TRAIN, 8, seed=1, balance=balance)
  fresh.set_state(state)
  assert _same(_take(fresh, 6), expected)


def test_train_shards_partition():
  src = _IdSource(30)
  seen = []
  for shard in range(3):
    it = pipeline.train_iter(src, _TRAIN, 5, seed=0, shard_index=shard,
                             shard_count=3)
    ids = np.concatenate([x["id"] for x in _take(it, 2)])  # one shard epoch
    assert sorted(ids) == list(range(shard, 30, 3))
    seen.append(set(ids))
  assert set.union(*seen) == set(range(30))
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.train_iter(src, _TRAIN, 5, seed=0, shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.train_iter(src, _TRAIN, 11, seed=0, shard_count=3)


@pytest.mark.parametrize("n,batch,shards", [(23, 8, 1), (24, 8, 1), (10, 3, 3),
                                            (7, 4, 2), (2, 4, 3)])
def test_eval_batches_cover_each_example_once(n, batch, shards):
  src = _IdSource(n)
  counts = np.zeros(n, int)
  num = pipeline.num_eval_batches(n, batch, shards)
  for shard in range(shards):
    batches = list(pipeline.eval_batches(src, _EVAL, batch, shard, shards))
    assert len(batches) == num  # same on every shard
    for b in batches:
      assert b["image"].shape == (batch, 4, 4, 3)
      assert b["valid"].shape == (batch,) and b["valid"].dtype == np.bool_
      np.add.at(counts, b["id"][b["valid"]], 1)
    valid_ids = np.concatenate([b["id"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(valid_ids, np.arange(shard, n, shards))
    flags = np.concatenate([b["valid"] for b in batches])
    assert not flags[len(valid_ids):].any()  # padding only at the end
  np.testing.assert_array_equal(counts, 1)
  again = list(pipeline.eval_batches(src, _EVAL, batch, 0, shards))
  assert _same(again, list(pipeline.eval_batches(src, _EVAL, batch, 0, shards)))


def test_class_weights():
  src = _IdSource(8, labels=[0, 0, 0, 0, 0, 0, 1, 1])
  w = pipeline.class_weights(src)
  np.testing.assert_allclose(w, [8 / 12, 8 / 4])
  assert np.isclose(w[src.labels].mean(), 1.0)
  w = pipeline.class_weights(src, num_classes=3)
  np.testing.assert_allclose(w, [8 / 12, 8 / 4, 0.0])


@functools.lru_cache(maxsize=None)
def _pneumonia_train(path):
  return sources.NpzSource(path, "train", num_classes=2)


def test_balanced_sampling_pneumonia(pneumonia_npz):
  src = _pneumonia_train(str(pneumonia_npz))
  assert src.labels.mean() > 0.7  # 3486 / 4693 pneumonia
  w = pipeline.class_weights(src)
  np.testing.assert_allclose(w, [4693 / (2 * 1207), 4693 / (2 * 3486)],
                             rtol=1e-6)
  fn = transforms.make_transform({"image_size": 16, "channels": 1}, True)
  it = pipeline.train_iter(src, fn, 64, seed=0, balance=True)
  labels = np.concatenate([b["label"] for b in _take(it, 40)])
  assert abs(labels.mean() - 0.5) < 0.05, labels.mean()
  it2 = pipeline.train_iter(src, fn, 64, seed=0, balance=True)
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in _take(it2, 40)]), labels)
  plain = pipeline.train_iter(src, fn, 64, seed=0)
  assert np.concatenate([b["label"] for b in _take(plain, 20)]).mean() > 0.65


def test_build_sources_npz_and_pipeline(pneumonia_npz):
  built = pipeline.build_sources({"source": "npz", "path": str(pneumonia_npz)},
                                 num_classes=2)
  assert {k: len(v) for k, v in built.items()} == {
      "train": 4693, "val": 523, "test": 624}
  fn = transforms.make_transform({"image_size": 32}, train=False)
  b = next(pipeline.eval_batches(built["test"], fn, 16))
  assert b["image"].shape == (16, 32, 32, 3) and b["label"].dtype == np.int32


def test_build_sources_seg_folder(kvasir_dir):
  built = pipeline.build_sources({"source": "seg_folder",
                                  "path": str(kvasir_dir)})
  assert {k: len(v) for k, v in built.items()} == {
      "train": 280, "val": 40, "test": 80}
  cfg = {"image_size": 32, "channels": 3,
         "augment": {"crop_scale": (0.5, 1.0), "hflip": True, "rotate": 10.0}}
  it = pipeline.train_iter(built["val"], transforms.make_transform(cfg, True),
                           4, seed=0)
  b = next(it)
  assert b["image"].shape == (4, 32, 32, 3) and b["mask"].shape == (4, 32, 32)
  assert b["mask"].dtype == np.int32 and set(np.unique(b["mask"])) <= {0, 1}


def test_build_sources_class_folder_jpeg_and_errors(tmp_path):
  for split in ("train", "validation"):
    for name in ("a", "b"):
      d = tmp_path / "cf" / split / name
      d.mkdir(parents=True)
      Image.fromarray(np.zeros((6, 6), np.uint8)).save(d / "x.png")
  built = pipeline.build_sources({"source": "class_folder",
                                  "path": str(tmp_path / "cf")})
  assert sorted(built) == ["train", "val"] and len(built["val"]) == 2
  import io  # pylint: disable=g-import-not-at-top
  blobs = []
  for v in range(4):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), v * 50, np.uint8)).save(buf, "JPEG")
    blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
  np.savez(tmp_path / "j.npz", jpeg_bytes=np.concatenate(blobs),
           offsets=offsets)
  built = pipeline.build_sources({"source": "jpeg_npz", "val_count": 1,
                                  "path": str(tmp_path / "j.npz")})
  assert {k: len(v) for k, v in built.items()} == {"train": 3, "val": 1}
  with pytest.raises(ValueError,
                     match=r"data.source='hdf5'.*'npz'.*'jpeg_npz'"):
    pipeline.build_sources({"source": "hdf5", "path": "x"})
  with pytest.raises(FileNotFoundError, match="data.path"):
    pipeline.build_sources({"source": "npz", "path": str(tmp_path / "no.npz")})
  with pytest.raises(ValueError, match="data.path is not set"):
    pipeline.build_sources({"source": "seg_folder"})


def test_train_iter_with_real_transform_is_fast_enough(pneumonia_npz):
  """Smoke check of the default 64 px pipeline (no timing assertion)."""
  src = _pneumonia_train(str(pneumonia_npz))
  fn = transforms.make_transform(
      {"image_size": 64, "channels": 3,
       "augment": {"crop_scale": (0.8, 1.0), "hflip": True}}, train=True)
  for b in itertools.islice(pipeline.train_iter(src, fn, 64, seed=0), 3):
    assert b["image"].shape == (64, 64, 64, 3)
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0


@pytest.mark.parametrize("text,cores,want", [("0", 16, 0), ("3", 2, 3), ("auto", 16, 14), ("auto", 64, 16),
                                             ("auto", 2, 0), (" AUTO ", 8, 6)])
def test_resolve_workers(monkeypatch, text, cores, want):
  monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(cores)), raising=False)
  monkeypatch.setattr("os.cpu_count", lambda: cores)
  assert pipeline.resolve_workers(text) == want


@pytest.mark.parametrize("bad", ["-1", "many", "2.5"])
def test_resolve_workers_rejects(bad):
  with pytest.raises(ValueError, match="data.workers"):
    pipeline.resolve_workers(bad)


def test_workers_give_the_same_batches_and_resume_exactly():
  """grain multiprocessing (2 spawned workers) = in-process, batch for batch, and its state resumes."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  src = _IdSource(30)
  expected = _take(pipeline.train_iter(src, _TRAIN, 8, seed=1), 9)
  it = pipeline.train_iter(src, _TRAIN, 8, seed=1, num_workers=2)
  got = _take(it, 5)  # crosses an epoch boundary
  state = it.get_state()
  fresh = pipeline.train_iter(src, _TRAIN, 8, seed=1, num_workers=2)
  fresh.set_state(state)
  got += _take(fresh, 4)
  assert _same(got, expected)


def test_workers_read_a_shared_cached_store(tmp_path, monkeypatch):
  """A cached (decoded) source reaches spawned workers as one file mapping; batches = in-process, cache on = off."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  rng = np.random.default_rng(0)
  for i in range(24):
    d = tmp_path / "train" / "ab"[i % 2]
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(d / f"{i}.png")
  monkeypatch.setattr(image_store, "SHARE_BYTES", 0)  # share even this tiny store
  on = sources.ClassFolderSource(tmp_path, "train", cache="on")
  off = sources.ClassFolderSource(tmp_path, "train", cache="off")
  fn = transforms.make_transform({"image_size": 16, "augment": {"crop_scale": (0.35, 1.0), "hflip": True}}, True)
  expected = _take(pipeline.train_iter(off, fn, 8, seed=2), 4)
  assert _same(_take(pipeline.train_iter(on, fn, 8, seed=2), 4), expected)
  assert _same(_take(pipeline.train_iter(on, fn, 8, seed=2, num_workers=1), 4), expected)
  assert on._store.columns["image"].file is not None  # pickled for the worker as a mapping


def test_input_pipeline_benchmark_cli():
  """benchmarks/input_pipeline.py prints the iterator rows, the step row and ends with the headroom line."""
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[2]
  r = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--config", "configs/experiment.py:smoke,px32",
                      "--batches", "2", "--steps", "1", "--workers", "0", "--cache", "on,off"],
                     cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert any(l.split()[:2] == ["on", "0"] for l in lines) and any(l.split()[:2] == ["off", "0"] for l in lines)
  assert any(l.split()[:1] == ["finetune"] for l in lines)
  assert lines[-1].startswith("headroom: ") and lines[-1].endswith("x")
  float(lines[-1].split()[1][:-1])


def _cached_folder(tmp_path, n=26, size=16, shape=None):
  """A class-folder split of n PNGs (size x size RGB unless shape), decoded into memory (data.cache=on)."""
  rng = np.random.default_rng(0)
  for i in range(n):
    d = tmp_path / "train" / "ab"[i % 2]
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape or (size, size, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
  return sources.ClassFolderSource(tmp_path, "train", cache="on")


_ON_DEVICE = transforms.make_transform({"image_size": 16, "augment": {"crop_scale": (0.35, 1.0), "hflip": True,
                                                                      "on_device": True}}, train=True)


def test_on_device_input_of_a_cached_split_is_gathered_a_batch_at_a_time(tmp_path):
  """data.augment.on_device + data.cache: each batch is one gather of the cached uint8 images (no per-example grain
  work); the records are what the per-example path reads (source[i] through the transform), every image once per
  epoch (drop remainder), a new order each epoch, the same for the seed."""
  src = _cached_folder(tmp_path)
  shard = pipeline._Subset(src, np.arange(len(src)))
  assert pipeline.batch_gather(shard, _ON_DEVICE)
  by_bytes = {_ON_DEVICE(src[i], np.random.default_rng(0))["image"].tobytes(): i for i in range(len(src))}
  it = pipeline.train_iter(src, _ON_DEVICE, 8, seed=3)
  epochs = [_take(it, 3), _take(it, 3)]  # 26 // 8 = 3 batches an epoch
  for epoch in epochs:
    ids = [by_bytes[img.tobytes()] for b in epoch for img in b["image"]]
    assert len(set(ids)) == 24
    for b in epoch:
      assert b["image"].dtype == np.uint8 and b["image"].shape == (8, 16, 16, 3) and b["label"].dtype == np.int32
      np.testing.assert_array_equal(b["label"], src.labels[[by_bytes[img.tobytes()] for img in b["image"]]])
  assert not _same(epochs[0], epochs[1])
  assert _same(_take(pipeline.train_iter(src, _ON_DEVICE, 8, seed=3), 6), epochs[0] + epochs[1])


def test_gathered_batches_resume_exactly_and_ignore_workers(tmp_path):
  src = _cached_folder(tmp_path)
  expected = _take(pipeline.train_iter(src, _ON_DEVICE, 8, seed=1), 8)
  it = pipeline.train_iter(src, _ON_DEVICE, 8, seed=1)
  got = _take(it, 4)  # crosses an epoch boundary
  fresh = pipeline.train_iter(src, _ON_DEVICE, 8, seed=1)
  fresh.set_state(it.get_state())
  assert _same(got + _take(fresh, 4), expected)
  assert _same(_take(pipeline.train_iter(src, _ON_DEVICE, 8, seed=1, num_workers=2), 8), expected)  # in-process


def test_batch_gather_only_where_a_batch_equals_the_per_example_reads(tmp_path):
  """Host augmentation, no cache, images of another size (the transform resizes them) and balanced sampling all
  keep the per-example path."""
  src = _cached_folder(tmp_path)
  view = lambda s: pipeline._Subset(s, np.arange(len(s)))
  assert not pipeline.batch_gather(view(src), _TRAIN)
  off = sources.ClassFolderSource(tmp_path, "train", cache="off")
  assert not pipeline.batch_gather(view(off), _ON_DEVICE)
  big = _cached_folder(tmp_path / "big", size=20)
  assert not pipeline.batch_gather(view(big), _ON_DEVICE)
  balanced = _take(pipeline.train_iter(src, _ON_DEVICE, 8, seed=0, balance=True), 1)[0]
  assert balanced["image"].shape == (8, 16, 16, 3)
