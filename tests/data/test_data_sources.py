"""Tests for tpp_jax.data.sources (shared data and tiny tmp_path files)."""
import csv
import functools
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tpp_jax.data import image_store, pipeline, sources

from conftest import jpeg_bytes, write_seg


@functools.lru_cache(maxsize=None)
def _npz(path, split):
  return sources.NpzSource(path, split, num_classes=2)


# ---------------------------------------------------------------------------
# NpzSource.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("split,count,n_pos", [("train", 4693, 3486),
                                                ("val", 523, 389),
                                                ("test", 624, 390)])
def test_npz_pneumonia_counts(pneumonia_npz, split, count, n_pos):
  src = _npz(str(pneumonia_npz), split)
  assert len(src) == count
  assert set(np.unique(src.labels)) == {0, 1}
  assert int(src.labels.sum()) == n_pos
  assert src.num_classes == 2
  rec = src[0]
  assert rec["image"].shape == (128, 128, 1) and rec["image"].dtype == np.uint8
  assert rec["label"].dtype == np.int32 and rec["label"].shape == ()
  assert src[-1]["image"].shape == (128, 128, 1)
  with pytest.raises(IndexError):
    src[count]


def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return path


def test_npz_rgb_tmp(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  y = np.array([0, 1, 2, 1, 0], np.int64)
  p = _write_npz(tmp_path / "rgb.npz", train_images=x, train_labels=y)
  src = sources.NpzSource(p, "train")
  assert len(src) == 5 and src.num_classes == 3
  np.testing.assert_array_equal(src[3]["image"], x[3])
  assert src[3]["label"] == 1


def test_npz_errors(tmp_path):
  x = np.zeros((4, 8, 8), np.uint8)
  p = _write_npz(tmp_path / "d.npz", train_images=x,
                 train_labels=np.array([[0], [1], [2], [1]]))
  with pytest.raises(FileNotFoundError, match="data.path"):
    sources.NpzSource(tmp_path / "missing.npz", "train")
  with pytest.raises(ValueError, match="'val_images'.*splits available"):
    sources.NpzSource(p, "val")
  with pytest.raises(ValueError, match=r"label 2 is outside \[0, 2\)"):
    sources.NpzSource(p, "train", num_classes=2)
  multi = _write_npz(tmp_path / "m.npz", train_images=x,
                     train_labels=np.zeros((4, 3), np.uint8))
  with pytest.raises(ValueError, match="multi-label"):
    sources.NpzSource(multi, "train")
  two_ch = _write_npz(tmp_path / "c.npz",
                      train_images=np.zeros((4, 8, 8, 2), np.uint8),
                      train_labels=np.zeros(4, np.uint8))
  with pytest.raises(ValueError, match="channels"):
    sources.NpzSource(two_ch, "train")
  bad_len = _write_npz(tmp_path / "l.npz", train_images=x,
                       train_labels=np.zeros(3, np.uint8))
  with pytest.raises(ValueError, match="train_labels"):
    sources.NpzSource(bad_len, "train")


# ---------------------------------------------------------------------------
# SegFolderSource.
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kvasir_sources():
  from conftest import shared_path  # pylint: disable=g-import-not-at-top
  root = shared_path("data", "kvasir_seg_256")
  return {s: sources.SegFolderSource(root, s) for s in ("train", "val", "test")}


def test_seg_folder_kvasir(kvasir_sources):
  counts = {s: len(src) for s, src in kvasir_sources.items()}
  assert counts == {"train": 280, "val": 40, "test": 80}
  for split, src in kvasir_sources.items():
    assert src.task == "segmentation" and src.num_classes == 2
    for i in (0, len(src) // 2, len(src) - 1):
      rec = src[i]
      assert rec["image"].dtype == np.uint8 and rec["image"].shape[-1] == 3
      assert rec["mask"].dtype == np.uint8
      assert rec["mask"].shape == rec["image"].shape[:2] == (256, 256)
      assert set(np.unique(rec["mask"])) == {0, 1}, (split, i)
  # Decoded once ('auto': 280 x 256 px pairs fit the budget): views of one
  # read-only buffer per key.
  a, b = kvasir_sources["val"][0], kvasir_sources["val"][0]
  assert np.shares_memory(a["image"], b["image"]) and not a["mask"].flags.writeable


def test_seg_folder_kvasir_mismatch(kvasir_dir, tmp_path):
  rows = list(csv.DictReader(open(kvasir_dir / "split.csv")))[:3]
  root = tmp_path / "kv"
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  for r in rows:
    shutil.copy(kvasir_dir / r["image"], root / r["image"])
    shutil.copy(kvasir_dir / r["mask"], root / r["mask"])
  with open(root / "split.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["image", "mask", "split"])
    w.writeheader()
    for r in rows:
      w.writerow({**r, "split": "train"})
  assert len(sources.SegFolderSource(root, "train")) == 3
  bad = root / rows[1]["mask"]
  Image.open(bad).resize((128, 128), Image.NEAREST).save(bad)
  with pytest.raises(ValueError, match=bad.name):
    sources.SegFolderSource(root, "train")


def test_seg_folder_multiclass_and_errors(tmp_path):
  write_seg(tmp_path / "a", ["train", "train", "val"], mask_values=(0, 1, 2))
  src = sources.SegFolderSource(tmp_path / "a", "train", num_classes=3)
  assert len(src) == 2
  assert set(np.unique(src[0]["mask"])) <= {0, 1, 2}
  assert src[0]["image"].shape == (12, 16, 3)
  with pytest.raises(ValueError, match="task.num_classes"):
    sources.SegFolderSource(tmp_path / "a", "val")[0]  # default 2 classes
  with pytest.raises(ValueError, match=r"split='test'.*\['train', 'val'\]"):
    sources.SegFolderSource(tmp_path / "a", "test")
  with pytest.raises(FileNotFoundError, match="data.path"):
    sources.SegFolderSource(tmp_path / "nope", "train")
  (tmp_path / "a" / "masks" / "1.png").unlink()
  with pytest.raises(FileNotFoundError, match="1.png"):
    sources.SegFolderSource(tmp_path / "a", "train", num_classes=3)


# ---------------------------------------------------------------------------
# ClassFolderSource.
# ---------------------------------------------------------------------------
def test_class_folder(tmp_path):
  rng = np.random.default_rng(0)
  layout = {"train": {"cat": 3, "dog": 2, "eel": 1}, "val": {"dog": 2}}
  for split, classes in layout.items():
    for name, n in classes.items():
      d = tmp_path / split / name
      d.mkdir(parents=True)
      for i in range(n):
        shape = (10, 14) if i % 2 else (10, 14, 3)  # grey and RGB mixed
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            d / f"{i}.png")
  (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
  train = sources.ClassFolderSource(tmp_path, "train")
  assert train.class_names == ("cat", "dog", "eel") and train.num_classes == 3
  assert len(train) == 6
  np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1, 2])
  assert train[0]["image"].shape == (10, 14, 3)
  assert train[1]["image"].shape == (10, 14, 1)
  val = sources.ClassFolderSource(tmp_path, "val")
  np.testing.assert_array_equal(val.labels, [1, 1])  # same index for 'dog'
  with pytest.raises(FileNotFoundError,
                     match=r"folders present: \['train', 'val'\]"):
    sources.ClassFolderSource(tmp_path, "test")
  with pytest.raises(ValueError, match="task.num_classes"):
    sources.ClassFolderSource(tmp_path, "train", num_classes=2)


# ---------------------------------------------------------------------------
# TfdsSource: tiny array_record builders prepared without TensorFlow.
# ---------------------------------------------------------------------------
class TppTestTinyCls(tfds.core.GeneratorBasedBuilder):
  """6 train / 3 test grey 16x16 images, 2 classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(16, 16, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=["normal", "abnormal"])})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 6),
            "test": self._generate_examples(100, 3)}

  def _generate_examples(self, start, n):
    for i in range(start, start + n):
      yield i, {"image": np.full((16, 16, 1), i, np.uint8), "label": i % 2}


class TppTestTinySeg(tfds.core.GeneratorBasedBuilder):
  """4 train RGB 8x8 images with {0,255} masks."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
        "mask": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8)})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      mask = np.zeros((8, 8, 1), np.uint8)
      mask[:i + 1] = 255
      yield i, {"image": np.full((8, 8, 3), i, np.uint8), "mask": mask}


def _prepare(builder_cls, data_dir):
  builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _prepare(TppTestTinyCls, data_dir)
  _prepare(TppTestTinySeg, data_dir)
  return data_dir


def test_tfds_classification(tfds_dir):
  src = sources.TfdsSource("tpp_test_tiny_cls", "train", data_dir=tfds_dir)
  assert len(src) == 6 and src.task == "classification"
  assert src.num_classes == 2 and src.class_names == ("normal", "abnormal")
  seen = set()
  for rec in src:
    assert rec["image"].shape == (16, 16, 1) and rec["image"].dtype == np.uint8
    assert rec["label"].dtype == np.int32
    value = int(rec["image"][0, 0, 0])
    assert rec["label"] == value % 2
    seen.add(value)
  assert seen == set(range(6))
  assert sorted(src.labels.tolist()) == [0, 0, 0, 1, 1, 1]
  half = sources.TfdsSource("tpp_test_tiny_cls", "train[:50%]",
                            data_dir=tfds_dir)
  assert len(half) == 3
  with pytest.raises(ValueError, match=r"no split 'val'.*\['test', 'train'\]"):
    sources.TfdsSource("tpp_test_tiny_cls", "val", data_dir=tfds_dir)
  with pytest.raises(ValueError, match="data.tfds_image_key"):
    sources.TfdsSource("tpp_test_tiny_cls", "train", data_dir=tfds_dir,
                       image_key="img")
  empty = tfds_dir / "empty"
  empty.mkdir(exist_ok=True)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    sources.TfdsSource("tpp_test_tiny_cls", "train", data_dir=empty)
  with pytest.raises(ValueError, match="data.tfds_name.*cannot find"):
    sources.TfdsSource("tpp_no_such_dataset", "train", data_dir=empty)


def test_tfds_segmentation_and_build_sources(tfds_dir):
  src = sources.TfdsSource("tpp_test_tiny_seg", "train", data_dir=tfds_dir)
  assert src.task == "segmentation" and len(src) == 4
  for rec in src:
    i = int(rec["image"][0, 0, 0])
    assert rec["mask"].shape == (8, 8) and rec["mask"].dtype == np.uint8
    assert rec["mask"].sum() == 8 * (i + 1)  # {0,255} -> {0,1}
  built = pipeline.build_sources(
      {"source": "tfds", "tfds_name": "tpp_test_tiny_cls",
       "tfds_data_dir": str(tfds_dir)})
  assert {k: len(v) for k, v in built.items()} == {"train": 6, "test": 3}
  built = pipeline.build_sources(
      {"source": "tfds", "tfds_name": "tpp_test_tiny_cls",
       "tfds_data_dir": str(tfds_dir),
       "tfds_splits": {"train": "train[:4]", "val": "train[4:]"}})
  assert {k: len(v) for k, v in built.items()} == {"train": 4, "val": 2}


# ---------------------------------------------------------------------------
# JpegNpzSource.
# ---------------------------------------------------------------------------
def test_jpeg_npz(tmp_path):
  colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128)]
  imgs = [np.broadcast_to(np.asarray(c, np.uint8), (16, 16, 3)).copy()
          for c in colours]
  imgs.append(np.full((16, 16), 90, np.uint8))  # a greyscale JPEG
  blobs = [jpeg_bytes(x) for x in imgs]
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
  p = tmp_path / "images_jpeg.npz"
  np.savez_compressed(p, jpeg_bytes=np.concatenate(blobs),
                      offsets=offsets.astype(np.int64))
  train = sources.JpegNpzSource(p, "train", val_count=2)
  val = sources.JpegNpzSource(p, "val", val_count=2)
  assert len(train) == 3 and len(val) == 2
  for src, first in ((train, 0), (val, 3)):
    for i in range(len(src)):
      rec = src[i]
      assert rec["image"].shape == (16, 16, 3)
      assert rec["image"].dtype == np.uint8
      assert rec["label"] == 0 and rec["label"].dtype == np.int32
      ref = imgs[first + i]
      ref = np.repeat(ref[..., None], 3, -1) if ref.ndim == 2 else ref
      assert np.abs(rec["image"].astype(int) - ref).max() <= 6
  with pytest.raises(ValueError, match="val_count"):
    sources.JpegNpzSource(p, "train", val_count=5)
  with pytest.raises(ValueError, match="splits"):
    sources.JpegNpzSource(p, "test")
  bad = _write_npz(tmp_path / "bad.npz", jpeg_bytes=np.zeros(3, np.uint8))
  with pytest.raises(ValueError, match="'offsets'"):
    sources.JpegNpzSource(bad, "train")


# ---------------------------------------------------------------------------
# data.cache: one ImageStore per split, bit-identical to per-item decoding.
# ---------------------------------------------------------------------------
def _tiny_sources(tmp_path, kind, cache):
  """A few-image source of `kind` (built once per kind) with data.cache=cache."""
  rng = np.random.default_rng(0)
  root = tmp_path / kind
  if kind in ("npz", "npz_compressed"):
    p = root.with_suffix(".npz")
    if not p.exists():
      save = np.savez if kind == "npz" else np.savez_compressed
      save(p, train_images=rng.integers(0, 256, (6, 9, 7), dtype=np.uint8),
           train_labels=np.arange(6) % 2)
    return sources.NpzSource(p, "train", cache=cache)
  if kind == "jpeg_npz":
    p = root.with_suffix(".npz")
    if not p.exists():
      imgs = [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(4)]
      imgs.append(rng.integers(0, 256, (12, 10), dtype=np.uint8))  # grey JPEG
      blobs = [jpeg_bytes(x) for x in imgs]
      np.savez(p, jpeg_bytes=np.concatenate(blobs),
               offsets=np.concatenate([[0], np.cumsum([len(b) for b in blobs])]))
    return sources.JpegNpzSource(p, "train", val_count=1, cache=cache)
  if kind == "class_folder":  # mixed sizes and channels: a ragged store
    if not root.exists():
      for i, shape in enumerate([(10, 14), (10, 14, 3), (7, 5, 3), (10, 14, 3)]):
        d = root / "train" / ("ab"[i % 2])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            d / f"{i}.png")
    return sources.ClassFolderSource(root, "train", cache=cache)
  if not root.exists():
    write_seg(root, ["train"] * 4)
  return sources.SegFolderSource(root, "train", cache=cache)


@pytest.mark.parametrize("kind", ["npz", "npz_compressed", "jpeg_npz",
                                  "class_folder", "seg_folder"])
def test_cache_on_off_bit_identical(tmp_path, kind):
  on = _tiny_sources(tmp_path, kind, "on")
  off = _tiny_sources(tmp_path, kind, "off")
  assert len(on) == len(off) > 2
  for i in range(len(on)):
    a, b = on[i], off[i]
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (kind, k)
      np.testing.assert_array_equal(a[k], b[k])
    assert not a["image"].flags.writeable  # views of the read-only store
  if kind == "npz":  # stored uncompressed: 'off' memory-maps the file
    assert off.mapped and not on.mapped
  elif kind == "npz_compressed":
    assert not off.mapped
  else:
    assert on._store is not None and off._store is None
  if kind == "class_folder":
    assert on._store.columns["image"].offsets is not None  # ragged


def test_cache_auto_decision(tmp_path, monkeypatch):
  from tpp_jax.data import config
  assert _tiny_sources(tmp_path, "jpeg_npz", "auto")._store is not None
  assert _tiny_sources(tmp_path, "seg_folder", "auto")._store is not None
  assert not _tiny_sources(tmp_path, "npz", "auto").mapped
  # auto estimates first item x count: 4 x 12x10x3 = 1440 bytes of images.
  monkeypatch.setattr(config, "CACHE_BUDGET", 1439)
  assert _tiny_sources(tmp_path, "jpeg_npz", "auto")._store is None
  monkeypatch.setattr(config, "CACHE_BUDGET", 1440)
  assert _tiny_sources(tmp_path, "jpeg_npz", "auto")._store is not None
  monkeypatch.setattr(config, "CACHE_BUDGET", 100)  # 6x9x7 npz > 100 bytes
  assert _tiny_sources(tmp_path, "npz", "auto").mapped
  assert not _tiny_sources(tmp_path, "npz_compressed", "auto").mapped
  monkeypatch.undo()
  # build_sources: 'auto' decodes per item where max_*_examples cuts the run.
  base = {"source": "jpeg_npz", "path": str(tmp_path / "jpeg_npz.npz"),
          "val_count": 1}
  built = pipeline.build_sources(dict(base, max_train_examples=2))
  assert built["train"]._store is None and built["val"]._store is not None
  built = pipeline.build_sources(dict(base, max_train_examples=2, cache="on"))
  assert built["train"]._store is not None


@pytest.mark.parametrize("bad", ["yes", True, 0, None, "of"])
def test_cache_bad_value_is_one_clear_error(tmp_path, bad):
  from tpp_jax.data import config
  with pytest.raises(ValueError, match=r"data\.cache=.*'auto'.*'on' or 'off'"):
    config.check_cache(bad)
  if bad is not None:  # None in a config block means 'the default'
    with pytest.raises(ValueError, match=r"data\.cache="):
      config.resolve({"cache": bad})
  with pytest.raises(ValueError, match=r"data\.cache="):
    _tiny_sources(tmp_path, "seg_folder", bad)
  assert config.resolve({"cache": " ON "}).cache == "on"


def test_store_reaches_workers_as_a_file_mapping(tmp_path, monkeypatch):
  import gc
  import pickle
  monkeypatch.setattr(image_store, "SHARE_BYTES", 0)
  src = _tiny_sources(tmp_path, "class_folder", "on")
  col = src._store.columns["image"]
  assert col.file is None
  copy = pickle.loads(pickle.dumps(src))
  path = col.file[0]  # shared on the first pickle, in the temp dir
  assert copy._store.columns["image"].file == col.file
  for i in range(len(src)):
    np.testing.assert_array_equal(copy[i]["image"], src[i]["image"])
  blob = pickle.dumps(src)
  assert path.encode() in blob and len(blob) < 4000
  del src, col, copy
  gc.collect()
  assert not os.path.exists(path)  # removed with the owning store
