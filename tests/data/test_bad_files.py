"""Bad input FILES end in one line that names the file and the fix, exit code 2, no traceback (DESIGN.md §3).

The first cases run `python -m tpp_jax.main` in a fresh process; the rest call the library in-process and check the
exception (the CLI prints any of main.USER_ERRORS as that one line). Every test writes its own tiny files.
"""
import json
import os
import struct
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tpp_jax import main
from tpp_jax.checkpoints import convert, hf_export, store
from tpp_jax.data import pipeline as data_pipeline
from tpp_jax.data import sources
from tpp_jax.models.vit import ViT, ViTConfig

from conftest import SMOKE_CLI as BASE
from conftest import jpeg_bytes, load_config, one_error_line, run_cli, tiny_npz, write_seg

SMOKE = "pneumonia,smoke,px32"


def _data(tmp_path):
  """A valid 32-image, 2-class, 32px npz with train/val/test."""
  images = np.random.default_rng(0).integers(0, 256, (32, 32, 32), dtype=np.uint8)
  return tiny_npz(tmp_path / "data.npz", images, np.arange(32) % 2)


def _cli(tmp_path, *args, data=None, torch_blocked=False):
  """The one error line of the CLI on `data` (default: the tiny npz) with `args`; exit 2 and no traceback checked."""
  env = None
  if torch_blocked:  # `import torch` fails in the child, as on a machine without torch
    shim = tmp_path / "no_torch"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
  data = data or _data(tmp_path)
  r = run_cli(BASE + ["--workdir", str(tmp_path / "run"), f"--config.data.path={data}", *args], timeout=180, env=env)
  return one_error_line(r)


def _config(tmp_path, arg=SMOKE):
  c = load_config("experiment", arg)
  c.data.path = str(_data(tmp_path))
  return c


def _backbone_state_dict(config) -> dict:
  """HF ViTModel names for the config's (plain) encoder, random init: a checkpoint that fits the model."""
  cfg = ViTConfig.from_config(config.model)
  x = np.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), np.float32)
  return hf_export.vit_state_dict(ViT(cfg).init(jax.random.key(0), x)["params"])


def _save_safetensors(path, sd):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, str(path))
  return path


def _flip_bytes(path, tensor: str, count: int = 1):
  """Overwrite the first `count` float32 values of `tensor` in a safetensors file with 0xFFFFFFFF (a NaN)."""
  raw = bytearray(path.read_bytes())
  n = struct.unpack("<Q", raw[:8])[0]
  start = 8 + n + json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
  raw[start:start + 4 * count] = b"\xff" * 4 * count
  path.write_bytes(bytes(raw))


# -- 1. truncated / corrupt safetensors as init.path ----------------------------------------------------------------

def test_truncated_safetensors_init_path(tmp_path):
  good = _save_safetensors(tmp_path / "good.safetensors", {"a": np.zeros((64, 64), np.float32)}).read_bytes()
  bad = tmp_path / "vit_base.safetensors"
  bad.write_bytes(good[:len(good) // 2])
  msg = _cli(tmp_path, f"--config.init.path={bad}")
  assert str(bad) in msg and "not a readable safetensors file" in msg and "truncated or corrupt" in msg, msg
  assert "download it again" in msg, msg


def test_random_bytes_safetensors_in_process(tmp_path):
  bad = tmp_path / "noise.safetensors"
  bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(ValueError, match=r"noise\.safetensors is not a readable safetensors file .*download it again"):
    c = _config(tmp_path)
    c.init.path = str(bad)
    main.run(c, str(tmp_path / "run"))


# -- 2. a .pth without torch; a corrupt .pth ------------------------------------------------------------------------

def test_pth_without_torch_says_how_to_install_it(tmp_path):
  import torch
  pth = tmp_path / "mae_pretrain.pth"
  torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}}, pth)
  msg = _cli(tmp_path, f"--config.init.path={pth}", torch_blocked=True)
  assert str(pth) in msg and "torch" in msg and "is not installed" in msg, msg
  assert "pip install torch" in msg and "https://download.pytorch.org/whl/cpu" in msg, msg
  assert ".safetensors" in msg, msg  # the other way out: convert it


def test_pth_without_torch_in_process(tmp_path, monkeypatch):
  pth = tmp_path / "x.pth"
  pth.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ValueError, match=r"x\.pth is a PyTorch checkpoint .*pip install torch"):
    convert.load_state_dict(pth)


def test_corrupt_pth(tmp_path):
  import torch
  pth = tmp_path / "cut.pth"
  torch.save({"model": {"w": torch.zeros(64, 64)}}, pth)
  pth.write_bytes(pth.read_bytes()[:3000])
  with pytest.raises(ValueError, match=r"cut\.pth is not a readable PyTorch checkpoint \(truncated: a zip archive"):
    convert.load_state_dict(pth)
  noise = tmp_path / "noise.pth"
  noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(ValueError, match=r"noise\.pth is not a readable PyTorch checkpoint .*download it again"):
    convert.load_state_dict(noise)


# -- 3. an npz that is not one --------------------------------------------------------------------------------------

def test_random_bytes_npz_data(tmp_path):
  bad = tmp_path / "noise.npz"
  bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  msg = _cli(tmp_path, data=bad)
  assert f"{bad} is not a valid .npz file (not a zip archive)" in msg and "pickle" not in msg, msg
  assert "download it again or re-create it with np.savez" in msg, msg


def test_truncated_npz_data(tmp_path):
  bad = tmp_path / "cut.npz"
  bad.write_bytes(_data(tmp_path).read_bytes()[:20000])
  msg = _cli(tmp_path, data=bad)
  assert f"{bad} is not a valid .npz file (a zip archive cut short: truncated)" in msg, msg


def test_npz_with_a_corrupt_member(tmp_path):
  """The zip directory is intact but a member's bytes are not (CRC error while reading)."""
  p = tmp_path / "flipped.npz"
  np.savez_compressed(p, train_images=np.zeros((8, 16, 16), np.uint8), train_labels=np.arange(8) % 2)
  raw = bytearray(p.read_bytes())
  raw[60:70] = bytes(b ^ 0xFF for b in raw[60:70])  # inside the first member's compressed data
  p.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"flipped\.npz \[train_\w+\] is corrupt .*download it again"):
    sources.NpzSource(p, "train", cache="on")
  (tmp_path / "noise.npz").write_bytes(b"\x00" * 100)
  for kind in ("npz", "jpeg_npz"):  # every npz reader says the same for a file that is not one
    with pytest.raises(ValueError, match=r"noise\.npz is not a valid \.npz file"):
      data_pipeline.build_sources({"source": kind, "path": str(tmp_path / "noise.npz")})


# -- 4. backbone weights with NaN / Inf -----------------------------------------------------------------------------

def test_nan_in_safetensors_backbone_names_file_and_tensors(tmp_path):
  c = _config(tmp_path)
  sd = _backbone_state_dict(c)
  path = _save_safetensors(tmp_path / "flipped.safetensors", sd)
  convert.load_pretrained(path, ViTConfig.from_config(c.model))  # loads as saved
  _flip_bytes(path, "encoder.layer.0.attention.attention.query.weight")
  _flip_bytes(path, "layernorm.bias", count=3)
  c.init.path = str(path)
  with pytest.raises(ValueError) as e:
    main.run(c, str(tmp_path / "run"))
  msg = str(e.value)
  assert f"init.path {path} holds NaN/Inf values in 2 tensor(s)" in msg, msg
  assert "encoder.layer.0.attention.attention.query.weight" in msg and "layernorm.bias" in msg, msg
  assert "the file is corrupt; download it again" in msg, msg


def test_inf_in_pth_and_tpp_weights(tmp_path):
  import torch
  c = _config(tmp_path)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in _backbone_state_dict(c).items()}
  sd["embeddings.cls_token"][0, 0, 0] = float("inf")
  torch.save({"model": sd}, tmp_path / "inf.pth")
  with pytest.raises(ValueError, match=r"inf\.pth holds NaN/Inf values in 1 tensor\(s\) \(embeddings\.cls_token\)"):
    convert.load_pretrained(tmp_path / "inf.pth", ViTConfig.from_config(c.model))
  cfg = ViTConfig.from_config(c.model)
  enc = ViT(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
  enc = jax.tree_util.tree_map(np.array, enc)
  enc["norm"]["scale"][0] = np.nan
  store.save_flat(tmp_path / "tpp.safetensors", {"encoder": enc})  # tpp_jax's own flat weights
  c.init.path = str(tmp_path / "tpp.safetensors")
  with pytest.raises(ValueError, match=r"tpp\.safetensors holds NaN/Inf .*\(encoder/norm/scale\): the file is corrupt"):
    main.run(c, str(tmp_path / "run"))


# -- 5. truncated / unreadable images -------------------------------------------------------------------------------

def _class_folder(root, n=4):
  rng = np.random.default_rng(0)
  for split in ("train", "val", "test"):
    for name in ("a", "b"):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / split / name / f"{i}.png")
  return root


def _truncate(path):
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  return path


def test_truncated_image_in_class_folder_with_workers(tmp_path):
  """Decoded per item (cache off) in a grain worker process: still the one line naming the image."""
  root = _class_folder(tmp_path / "cls")
  bad = _truncate(root / "train" / "b" / "2.png")
  msg = _cli(tmp_path, "--config.data.source=class_folder", "--config.data.cache=off", "--config.data.workers=1",
             "--config.batch_size=8", "--config.eval_batch_size=8", "--config.steps=2", data=root)
  assert f"image {bad} cannot be decoded, the file is truncated or corrupt" in msg, msg
  assert "replace it or delete it" in msg, msg


def test_truncated_image_in_class_folder_cached(tmp_path):
  root = _class_folder(tmp_path / "cls")
  bad = _truncate(root / "val" / "a" / "1.png")
  c = load_config("experiment", SMOKE + ",data.source=class_folder,data.cache=on")
  c.data.path = str(root)
  with pytest.raises(ValueError, match=f"image {bad} cannot be decoded"):
    main.run(c, str(tmp_path / "run"))
  (root / "val" / "a" / "1.png").write_bytes(b"GIF89a not really")  # not an image at all
  with pytest.raises(ValueError, match=r"1\.png cannot be decoded, the file is truncated or corrupt"):
    sources.ClassFolderSource(root, "val", cache="off")[1]


def test_unreadable_images_in_seg_folder(tmp_path):
  write_seg(tmp_path / "seg", ["train", "train", "val"])
  root = tmp_path / "seg"
  _truncate(root / "images" / "1.png")
  with pytest.raises(ValueError, match=r"image .*images/1\.png cannot be decoded.*remove its row from split\.csv"):
    sources.SegFolderSource(root, "train", cache="on")
  assert len(sources.SegFolderSource(root, "train", cache="off")) == 2  # images off the cache: found when read
  _truncate(root / "masks" / "0.png")  # masks are all read up front, cache or not
  with pytest.raises(ValueError, match=r"mask .*masks/0\.png cannot be decoded"):
    sources.SegFolderSource(root, "train", cache="off")
  (root / "masks" / "2.png").write_bytes(b"\x00" * 64)  # not even a header
  with pytest.raises(ValueError, match=r"mask .*masks/2\.png cannot be decoded"):
    sources.SegFolderSource(root, "val")


def test_corrupt_jpeg_in_jpeg_npz(tmp_path):
  rng = np.random.default_rng(0)
  blobs = [jpeg_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
  blobs[2] = blobs[2][:40]  # cut short
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
  p = tmp_path / "images_jpeg.npz"
  np.savez(p, jpeg_bytes=np.concatenate(blobs), offsets=offsets)
  with pytest.raises(ValueError, match=r"images_jpeg\.npz image #2: cannot decode JPEG"):
    sources.JpegNpzSource(p, "train", val_count=1, cache="on")


# -- 6. mask class ids >= task.num_classes, found when the sources are built ----------------------------------------

def test_mask_class_outside_num_classes_found_up_front(tmp_path):
  write_seg(tmp_path / "seg", ["train"] * 6 + ["val", "test"], size=(32, 32), mask_values=(0, 1))
  root = tmp_path / "seg"
  mask = np.asarray(Image.open(root / "masks" / "4.png")).copy()
  mask[0, 0] = 3
  Image.fromarray(mask).save(root / "masks" / "4.png")
  c = load_config("experiment", "kvasir,smoke,px32")  # max_train_examples: cache 'auto' is off, nothing decoded
  c.data.path = str(root)
  with pytest.raises(ValueError, match=r"masks/4\.png: class index 3 is outside \[0, 2\) \(task\.num_classes=2\)") as e:
    main.run(c, str(tmp_path / "run"))
  assert "at least 4" in str(e.value), e.value
  assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any training step
  with pytest.raises(ValueError, match="class index 3"):
    sources.SegFolderSource(root, "train", num_classes=2, cache="off")  # the source itself, not its first read
  assert len(sources.SegFolderSource(root, "train", num_classes=4, cache="off")) == 6


# -- 7. eval_splits the data lacks ----------------------------------------------------------------------------------

def test_check_eval_splits():
  check = data_pipeline.check_eval_splits
  data = {"train": [0], "val": [0]}
  assert check(data, ("val",), "data.path=/d.npz", True) == []
  assert check(data, ("val", "test"), "data.path=/d.npz", True) == [
      "warning: data.path=/d.npz has no 'test' split; eval_splits asks for it, so final metrics skip it"]
  assert check(data, "val,test", "data.path=/d.npz", True) == check(data, ("val", "test"), "data.path=/d.npz", True)
  assert check(data, (), "data.path=/d.npz", True) == []
  assert len(check({"train": [0]}, ("val", "test"), "x", False)) == 2  # no final metrics needed: warnings only
  with pytest.raises(ValueError) as e:
    check(data, ("test",), "data.path=/d.npz", True)
  msg = str(e.value)
  assert "data.path=/d.npz has none of eval_splits=['test']" in msg and "['train', 'val']" in msg, msg
  assert "final metrics would be empty" in msg and "--config.eval_splits=\"('val',)\"" in msg, msg
  assert isinstance(e.value, main.USER_ERRORS)


# -- 8. split.csv paths that leave the data folder ------------------------------------------------------------------

def _rewrite_row(root, index, column, value):
  """split.csv of `root` with data row `index` (0-based) having `column` = `value`."""
  import csv
  with open(root / "split.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  rows[index][column] = value
  with open(root / "split.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["image", "mask", "split"])
    w.writeheader()
    w.writerows(rows)


def _escape_message(root, row, column, value):
  return (f"{root / 'split.csv'} row {row} (line {row + 1}): {column} path {value!r} resolves to ",
          "paths in split.csv are relative to DATA_ROOT (data.path=", "and must stay inside it")


def test_seg_split_csv_path_outside_the_data_root_cli(tmp_path):
  """`../secret.png` is a readable image beside the data folder: refused by name, not opened, through the CLI."""
  root = tmp_path / "seg"
  write_seg(root, ["train"] * 4 + ["val", "test"], size=(32, 32))
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "secret.png")
  _rewrite_row(root, 2, "image", "../secret.png")
  r = run_cli(["--config", "configs/experiment.py:kvasir,smoke,px32", f"--config.data.path={root}",
               "--workdir", str(tmp_path / "run")], timeout=180)
  msg = one_error_line(r)
  for part in _escape_message(root, 3, "image", "../secret.png"):
    assert part in msg, msg
  assert str(tmp_path / "secret.png") in msg, msg
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "mask_in_other_split"])
def test_seg_split_csv_path_outside_the_data_root(tmp_path, case):
  root = tmp_path / "seg"
  write_seg(root, ["train", "train", "val"])
  outside = tmp_path / "elsewhere" / "x.png"
  outside.parent.mkdir()
  Image.fromarray(np.zeros((12, 16), np.uint8)).save(outside)  # a real, readable image: only the check stops it
  if case == "dotdot":
    row, column, value = 1, "image", "images/../../elsewhere/x.png"
  elif case == "absolute":
    row, column, value = 2, "mask", str(outside)
  elif case == "symlink":  # inside by name, outside once the link is followed
    (root / "masks" / "link.png").symlink_to(outside)
    row, column, value = 1, "mask", "masks/link.png"
  else:  # a bad row of the val split stops the train split too: every row is checked
    row, column, value = 3, "mask", "../elsewhere/x.png"
  _rewrite_row(root, row - 1, column, value)
  for build in (lambda: sources.SegFolderSource(root, "train"),
                lambda: data_pipeline.build_sources({"source": "seg_folder", "path": str(root)}, num_classes=2)):
    with pytest.raises(ValueError) as e:
      build()
    msg = str(e.value)
    for part in _escape_message(root, row, column, value):
      assert part in msg, msg
    assert f"outside the data folder {root.resolve()}" in msg, msg
    assert str(outside.resolve()) in msg, msg


def test_seg_split_csv_paths_inside_the_root_still_load(tmp_path):
  """`..` that stays inside, and a data root reached through a symlink, are fine."""
  write_seg(tmp_path / "seg", ["train", "train", "val"])
  _rewrite_row(tmp_path / "seg", 0, "image", "masks/../images/0.png")
  (tmp_path / "link").symlink_to(tmp_path / "seg")
  for root in (tmp_path / "seg", tmp_path / "link"):
    src = sources.SegFolderSource(root, "train")
    assert len(src) == 2 and src[0]["image"].shape == (12, 16, 3)


# -- 9. an npz split with images but no labels ----------------------------------------------------------------------

def _npz_without(tmp_path, missing):
  images = np.random.default_rng(0).integers(0, 256, (32, 32, 32), dtype=np.uint8)
  arrays = {f"{s}_{k}": images if k == "images" else np.arange(32) % 2
            for s in ("train", "val", "test") for k in ("images", "labels")}
  del arrays[missing]
  p = tmp_path / f"no_{missing}.npz"
  np.savez(p, **arrays)
  return p


def test_npz_val_images_without_labels_cli(tmp_path):
  """It used to train to exit 0 with `best: null` after a warning; now one line names the file and the key."""
  npz = _npz_without(tmp_path, "val_labels")
  r = run_cli(["--config", "configs/experiment.py:demo,smoke", f"--config.data.path={npz}",
               "--workdir", str(tmp_path / "run")], timeout=180)
  msg = one_error_line(r)
  assert f"data.path: {npz} has 'val_images' but no 'val_labels'" in msg, msg
  assert "Add 'val_labels' ((N,) integer class indices) to the npz, or remove 'val_images'." in msg, msg
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_npz_images_without_labels_in_process(tmp_path):
  no_train = _npz_without(tmp_path, "train_labels")
  with pytest.raises(ValueError, match=r"no_train_labels\.npz has 'train_images' but no 'train_labels'") as e:
    data_pipeline.build_sources({"source": "npz", "path": str(no_train)}, num_classes=2)
  assert "no 'train' split" not in str(e.value) and isinstance(e.value, main.USER_ERRORS)
  only_images = tmp_path / "only_images.npz"  # no images / labels pair at all: still names the key
  np.savez(only_images, train_images=np.zeros((4, 8, 8), np.uint8))
  with pytest.raises(ValueError, match=r"has 'train_images' but no 'train_labels'"):
    data_pipeline.build_sources({"source": "npz", "path": str(only_images)}, num_classes=2)
  no_test = _npz_without(tmp_path, "test_labels")
  for split in ("train", "val", "test"):
    with pytest.raises(ValueError, match=r"has 'test_images' but no 'test_labels'.* or remove 'test_images'\."):
      sources.NpzSource(no_test, split, num_classes=2)
  # Stages without labels (pretrain / tpp: num_classes None) still read such a file: the unlabelled split is left out.
  assert sorted(data_pipeline.build_sources({"source": "npz", "path": str(no_test)})) == ["train", "val"]
  assert len(sources.NpzSource(no_test, "train")) == 32
