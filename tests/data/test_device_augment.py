"""data.augment.on_device: crop / flips / normalisation in the jitted train step, checked against the host
transform (PIL) and through the CLI (training, exact resume, one error for what it cannot do)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tpp_jax import build as build_lib
from tpp_jax import config as config_lib
from tpp_jax import engine
from tpp_jax.data import device_augment, transforms

from conftest import load_config, one_error_line, run_cli

S = 16
BOXES = np.array([[0, 0, S, S], [2, 3, 10, 8], [5, 0, 11, 16], [0, 7, 3, 9], [1, 1, 1, 1], [4, 4, 12, 12]], np.int32)


def _host_geometry(arr, box, flip_h, flip_v, resample):
  t, l, h, w = (int(v) for v in box)
  return transforms._geometry(arr, S, (l, t, l + w, t + h), bool(flip_h), bool(flip_v), None, resample)


def test_crop_resize_and_flips_match_the_host_transform_in_pil():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (len(BOXES), S, S, 3), dtype=np.uint8)
  masks = rng.integers(0, 3, (len(BOXES), S, S)).astype(np.int32)
  flip_h = np.array([0, 1, 0, 1, 0, 1], bool)
  flip_v = np.array([0, 0, 1, 1, 0, 1], bool)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  out = device_augment.apply({"image": jnp.asarray(images), "mask": jnp.asarray(masks), "label": jnp.arange(6)},
                             jnp.asarray(BOXES), jnp.asarray(flip_h), jnp.asarray(flip_v), mean, std)
  host = transforms.RecordTransform(S, 3, mean, std)  # its normalisation, on the PIL crop (uint8, as the host has)
  for i, box in enumerate(BOXES):
    pil = _host_geometry(images[i], box, flip_h[i], flip_v[i], Image.BILINEAR)
    # PIL rounds the resized values to uint8 in fixed point; the device keeps them exact: within one grey level
    scale = 1 / (255 * np.asarray(std, np.float32))
    assert np.abs(np.asarray(out["image"][i]) - host._normalize(pil)).max() <= 1.001 * scale.max(), i
    pil_mask = _host_geometry(masks[i].astype(np.uint8), box, flip_h[i], flip_v[i], Image.NEAREST)
    np.testing.assert_array_equal(np.asarray(out["mask"][i]), pil_mask)
  np.testing.assert_array_equal(np.asarray(out["label"]), np.arange(6))
  assert out["image"].dtype == jnp.float32


def test_crop_boxes_follow_the_crop_rule_and_the_key():
  scale, ratio, size, n = (0.35, 1.0), (3 / 4, 4 / 3), 64, 4096
  boxes = np.asarray(device_augment.crop_boxes(jax.random.key(3), n, size, scale, ratio))
  top, left, h, w = boxes.T
  assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
  assert (top + h <= size).all() and (left + w <= size).all()
  area = h * w / size ** 2
  aspect = w / h
  inside = ((area >= scale[0] - 0.03) & (area <= scale[1] + 0.03)
            & (aspect >= ratio[0] * 0.9) & (aspect <= ratio[1] / 0.9))
  assert inside.all()  # (integer boxes: a little outside the continuous ranges)
  assert len({tuple(b) for b in boxes}) > n // 4  # per-example draws
  again = np.asarray(device_augment.crop_boxes(jax.random.key(3), n, size, scale, ratio))
  np.testing.assert_array_equal(boxes, again)
  # the same distribution of positions as the host's rule (uniform over the places the box fits)
  rng = np.random.default_rng(0)
  host = np.array([transforms.crop_box(rng, size, size, scale, ratio) for _ in range(n)])
  host_area = (host[:, 2] - host[:, 0]) * (host[:, 3] - host[:, 1]) / size ** 2
  host_aspect = (host[:, 2] - host[:, 0]) / (host[:, 3] - host[:, 1])
  assert area.mean() == pytest.approx(host_area.mean(), abs=0.01)  # the same rule: the same distributions
  assert area.std() == pytest.approx(host_area.std(), abs=0.01)
  assert np.log(aspect).mean() == pytest.approx(np.log(host_aspect).mean(), abs=0.01)
  assert math.isclose(np.median(top / np.maximum(size - h, 1)), 0.5, abs_tol=0.05)


def test_the_host_ships_uint8_resized_images_and_draws_nothing():
  c = load_config("default", "smoke,stage=finetune,data.augment.on_device=True")
  fn = transforms.make_transform(c.data, train=True)
  rec = {"image": np.random.default_rng(0).integers(0, 256, (40, 40, 1), dtype=np.uint8), "label": 1}
  a, b = fn(rec, np.random.default_rng(1)), fn(rec, np.random.default_rng(2))
  assert a["image"].dtype == np.uint8 and a["image"].shape == (c.data.image_size, c.data.image_size, 3)
  np.testing.assert_array_equal(a["image"], b["image"])
  plain = transforms.make_transform(c.data, train=False)(rec)  # = the eval transform before its normalisation
  np.testing.assert_allclose(transforms.RecordTransform(c.data.image_size, 3, c.data.mean, c.data.std)._normalize(
      a["image"]), plain["image"], atol=1e-6)
  assert device_augment.make(load_config("default", "smoke").data) is None


def test_the_train_step_augments_with_its_own_key_per_step(tmp_path):
  c = load_config("default", "smoke,stage=finetune,data.augment.on_device=True,eval_splits=()")
  t = engine.Trainer(config_lib.validate(c), tmp_path / "run")
  batch = next(t.train_iterator())
  assert batch["image"].dtype == np.uint8
  aug = device_augment.make(c.data)
  k = jax.random.fold_in(jax.random.fold_in(t.base_rng, 0), build_lib.AUGMENT_STREAM)
  x0 = aug(jax.tree_util.tree_map(jnp.asarray, batch), k)["image"]
  x1 = aug(jax.tree_util.tree_map(jnp.asarray, batch), jax.random.fold_in(k, 1))["image"]
  assert x0.dtype == jnp.float32 and not np.allclose(x0, x1)
  assert float(jnp.abs(x0).max()) < 5  # normalised values
  state, mets = t.train_step(t.state, build_lib.global_batch(batch, t.mesh), t.base_rng)
  assert np.isfinite(float(mets["loss"])) and int(state["step"]) == 1


def test_cli_trains_with_device_augmentation_and_resumes_exactly(tmp_path):
  common = ["--config", "configs/default.py:smoke,stage=finetune,data.augment.on_device=True,data.augment.vflip=True",
            "--config.log_every=1", "--config.checkpoint_every=2", "--config.eval_splits=()", "--config.steps=6"]
  full, half = tmp_path / "full", tmp_path / "half"
  r = run_cli(common + ["--workdir", str(full)])
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_cli(common + ["--workdir", str(half), "--config.stop_after=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_cli(common + ["--workdir", str(half)])
  assert r.returncode == 0, r.stderr[-3000:]

  def losses(wd):
    rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  assert losses(full) == losses(half) and len(losses(full)) == 6
  assert json.loads((full / "config.json").read_text())["data"]["augment"]["on_device"] is True


def test_what_device_augmentation_cannot_do_is_one_error(tmp_path):
  r = run_cli(["--config", "configs/default.py:smoke,stage=finetune,data.augment.on_device=True,data.augment.rotate=10",
               "--workdir", str(tmp_path / "a")])
  line = one_error_line(r)
  assert "data.augment.on_device" in line and "data.augment.rotate=0" in line, line
  r = run_cli(["--config", "configs/default.py:smoke,stage=tpp,pretext.type=contrastive,data.augment.on_device=True",
               "--workdir", str(tmp_path / "b")])
  line = one_error_line(r)
  assert "data.augment.on_device=False" in line and "contrastive" in line, line
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_stage0_on_a_cached_split_gathers_whole_batches_and_resumes_exactly(tmp_path):
  """Stage 0 as launch/house_gpu.sh runs it (data.augment.on_device, the split cached in memory at image_size): the
  input is one gather per batch (pipeline.batch_gather), and a run stopped and resumed logs the same losses."""
  from tpp_jax.data import pipeline

  from conftest import jpeg_bytes

  rng = np.random.default_rng(0)
  parts = [jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(96)]
  data = tmp_path / "photos.npz"
  np.savez(data, jpeg_bytes=np.concatenate(parts), offsets=np.cumsum([0] + [len(p) for p in parts]))
  spec = (f"configs/house_backbone.py:smoke,data.path={data},data.val_count=16,data.augment.on_device=True,"
          "data.cache=on,data.max_train_examples=0")
  c = load_config("house_backbone", spec.split(":", 1)[1])
  train = pipeline.build_sources(c.data)["train"]
  assert pipeline.batch_gather(pipeline._Subset(train, np.arange(len(train))), transforms.make_transform(c.data, True))
  common = ["--config", spec, "--config.log_every=1", "--config.checkpoint_every=2", "--config.eval_splits=()",
            "--config.epochs=0", "--config.steps=6", "--config.batch_size=32"]
  full, half = tmp_path / "full", tmp_path / "half"
  for args in ([str(full)], [str(half), "--config.stop_after=3"], [str(half)]):
    r = run_cli(common + ["--workdir", args[0], *args[1:]])
    assert r.returncode == 0, r.stderr[-3000:]

  def losses(wd):
    return {r["step"]: r["loss"] for r in map(json.loads, open(wd / "metrics.jsonl")) if r["split"] == "train"}
  assert losses(full) == losses(half) and len(losses(full)) == 6
