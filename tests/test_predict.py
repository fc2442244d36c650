"""python -m tpp_jax.predict: a trained run on new images (npz / folders of any size and format), the
same predictions as its eval stage, unreadable files listed, one clear error for bad input, seg masks."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tpp_jax import predict

from conftest import ROOT

DEMO = ROOT / "tpp_jax" / "assets" / "demo_cxr_64" / "demo_cxr_64.npz"


def run_predict(args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tpp_jax.predict", *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def fails_cleanly(argv, capsys, match):
  with pytest.raises(SystemExit) as e:
    predict.main(argv + ["--no-progress"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err and err.startswith("error: "), err
  assert match in err, err


def test_classification_matches_the_eval_stage(cls_run, tmp_path):
  wd, ev = cls_run
  with np.load(DEMO) as d:
    images, labels = d["test_images"], d["test_labels"][:, 0]
  # (i) the npz, through the CLI
  r = run_predict([wd, DEMO, tmp_path / "npz", "--split", "test", "--checkpoint", "latest", "--no-progress"])
  assert r.returncode == 0, r.stderr[-3000:]
  rows = read_csv(tmp_path / "npz" / "predictions.csv")
  assert list(rows[0]) == ["file", "prediction", "prob_0", "prob_1"] and rows[17]["file"] == "test[17]"
  pred = np.asarray([int(x["prediction"]) for x in rows])
  probs = np.asarray([[float(x["prob_0"]), float(x["prob_1"])] for x in rows])
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
  acc = float(np.mean(pred == labels))
  print(f"\n[predict vs eval, {len(rows)} demo test images] predictions.csv accuracy {acc:.6f}, "
        f"eval.json accuracy {ev['accuracy']:.6f}")
  assert acc == ev["accuracy"], (acc, ev)
  assert 0 < pred.mean() < 1  # both classes are predicted: the comparison is not trivial
  assert read_csv(tmp_path / "npz" / "errors.csv") == []

  # (ii) the same images as files: 64 px in mixed formats (grey PNG, RGB PNG/BMP/TIFF) give the same numbers
  same = tmp_path / "same"
  (same / "sub").mkdir(parents=True)
  n = 48
  for i in range(n):
    img = Image.fromarray(images[i])
    if i % 4:
      img = img.convert("RGB")
    img.save(same / ("sub" if i % 2 else ".") / f"x{i:03d}{['.png', '.png', '.bmp', '.tif'][i % 4]}")
  predict.main([str(wd), str(same), str(tmp_path / "same_out"), "--checkpoint", "latest", "--no-progress"])
  got = {x["file"].split("/")[-1][:4]: x for x in read_csv(tmp_path / "same_out" / "predictions.csv")}
  assert len(got) == n
  for i in range(n):
    g = got[f"x{i:03d}"]
    assert int(g["prediction"]) == pred[i]
    np.testing.assert_allclose([float(g["prob_0"]), float(g["prob_1"])], probs[i], atol=1e-5)

  # (iii) PNGs at 80 px: the transform resizes (80 -> 32 instead of 64 -> 32), so only nearly the same
  big = tmp_path / "big"
  big.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).resize((80, 80), Image.BILINEAR).save(big / f"img_{i:04d}.png")
  predict.main([str(wd), str(big), str(tmp_path / "big_out"), "--checkpoint", "latest", "--batch-size", "64",
                "--no-progress"])
  rows = read_csv(tmp_path / "big_out" / "predictions.csv")
  assert [x["file"] for x in rows] == [f"img_{i:04d}.png" for i in range(len(images))]
  probs80 = np.asarray([[float(x["prob_0"]), float(x["prob_1"])] for x in rows])
  np.testing.assert_allclose(probs80.sum(1), 1.0, atol=1e-6)
  agree = float(np.mean(probs80.argmax(1) == pred))
  print(f"[80 px PNG folder] accuracy {np.mean(probs80.argmax(1) == labels):.4f}, agreement with npz {agree:.3f}, "
        f"max |dp| {np.abs(probs80 - probs).max():.4f}")
  assert agree > 0.95 and np.abs(probs80 - probs).mean() < 0.02


def test_unreadable_file_is_listed_and_the_rest_predicted(cls_run, tmp_path, capsys):
  wd, _ = cls_run
  d = tmp_path / "in"
  d.mkdir()
  Image.fromarray(np.full((40, 30), 128, np.uint8)).save(d / "good.png")
  (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  (d / "notes.txt").write_text("ignored: not an image")
  with pytest.raises(SystemExit) as e:  # the rest are predicted, and the exit code says not all were
    predict.main([str(wd), str(d), str(tmp_path / "out"), "--no-progress"])
  assert e.value.code == 1
  captured = capsys.readouterr()
  assert "1 could not be read" in captured.out
  assert captured.err.splitlines()[-1] == (f"error: 1 of 2 input(s) could not be read; the others are predicted. "
                                           f"See {tmp_path / 'out' / 'errors.csv'}.")
  # the 40x30 image is squashed to the square input: one warning, naming it
  assert captured.err.count("warning:") == 1 and "good.png: 40x30 (HxW) is squashed to 32x32" in captured.err
  rows = read_csv(tmp_path / "out" / "predictions.csv")
  assert [x["file"] for x in rows] == ["good.png"]
  errors = read_csv(tmp_path / "out" / "errors.csv")
  assert [e["file"] for e in errors] == ["broken.jpg"] and "cannot identify image file" in errors[0]["error"]
  summary = json.loads((tmp_path / "out" / "predict.json").read_text())
  assert summary["predicted"] == 1 and summary["errors"] == 1 and summary["checkpoint"] == "latest"


def test_bad_input_or_run_is_one_clear_error(cls_run, tmp_path, capsys):
  wd, _ = cls_run
  (tmp_path / "empty").mkdir()
  fails_cleanly([str(wd), str(tmp_path / "empty"), str(tmp_path / "o")], capsys, "holds no images")
  fails_cleanly([str(wd), str(tmp_path / "missing"), str(tmp_path / "o")], capsys, "does not exist")
  fails_cleanly([str(wd), str(DEMO), str(tmp_path / "o")], capsys, "--split (test, train, val)")
  fails_cleanly([str(tmp_path), str(DEMO), str(tmp_path / "o")], capsys, "not a run folder")
  tpp = tmp_path / "tpp"
  tpp.mkdir()
  cfg = json.loads((wd / "config.json").read_text())
  (tpp / "config.json").write_text(json.dumps({**cfg, "stage": "tpp"}))
  r = run_predict([tpp, DEMO, tmp_path / "o", "--split", "test"])  # through the real CLI
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.startswith("error: ") and "'tpp' run: it has no task head" in r.stderr, r.stderr


def test_an_out_that_holds_files_is_refused_unless_overwrite(cls_run, tmp_path, capsys):
  wd, _ = cls_run
  d, out = tmp_path / "in", tmp_path / "out"
  d.mkdir()
  Image.fromarray(np.full((32, 32), 100, np.uint8)).save(d / "a.png")
  predict.main([str(wd), str(d), str(out), "--no-progress"])
  (out / "mine.txt").write_text("the user's own file")
  files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  fails_cleanly([str(wd), str(d), str(out)], capsys, "already holds files; choose a new folder, or add --overwrite")
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing touched
  Image.fromarray(np.full((32, 32), 200, np.uint8)).save(d / "b.png")
  predict.main([str(wd), str(d), str(out), "--no-progress", "--overwrite"])
  assert [x["file"] for x in read_csv(out / "predictions.csv")] == ["a.png", "b.png"]
  assert (out / "mine.txt").read_text() == "the user's own file"  # only an earlier prediction's files are replaced


def test_segmentation_masks_are_the_argmax_of_bilinearly_upsampled_logits(seg_run, tmp_path):
  """Against torch's bilinear interpolation (align_corners=False) of the model's logits."""
  import torch

  from tpp_jax.predictor import Predictor
  run, _ = seg_run
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)
  model = Predictor(run)
  batch = np.repeat(model.prepare(image)[None], model.batch_size, axis=0)
  logits = np.asarray(model._fn(*model._params, batch))[0]  # (S, S, K) on the model's grid
  up = torch.nn.functional.interpolate(torch.from_numpy(np.array(logits)).permute(2, 0, 1)[None], size=(45, 70),
                                       mode="bilinear", align_corners=False)[0].argmax(0).numpy()
  ours = model.predict([image])[0]
  nearest = np.asarray(Image.fromarray(logits.argmax(-1).astype(np.uint8)).resize((70, 45), Image.NEAREST))
  assert ours.shape == (45, 70) and (ours == up).mean() > 0.995
  assert (nearest != up).any()  # the upsampling the test tells apart from the old nearest-neighbour one


def test_segmentation_masks_at_the_original_size(seg_run, tmp_path):
  run, data = seg_run
  rng = np.random.default_rng(0)
  new = tmp_path / "new"
  (new / "a").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(new / "a" / "wide.png")
  Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(new / "grey.jpg")
  shutil.copy(data / "images" / "11.png", new / "polyp.png")
  predict.main([str(run), str(new), str(tmp_path / "out"), "--no-progress"])
  out = tmp_path / "out"
  rows = {x["file"]: x for x in read_csv(out / "predictions.csv")}
  assert set(rows) == {"a/wide.png", "grey.jpg", "polyp.png"}
  for name, (h, w) in {"a/wide.png": (37, 50), "grey.jpg": (64, 64), "polyp.png": (32, 32)}.items():
    r = rows[name]
    mask = np.asarray(Image.open(out / r["mask"]))
    over = np.asarray(Image.open(out / r["overlay"]))
    assert mask.shape == (h, w) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert over.shape == (h, w, 3)
    assert (int(r["height"]), int(r["width"])) == (h, w)
    assert float(r["frac_background"]) + float(r["frac_foreground"]) == pytest.approx(1.0, abs=1e-5)
  assert (out / "masks" / "a" / "wide.png").exists() and (out / "overlays" / "grey.png").exists()


def test_a_predict_that_dies_midway_leaves_no_predictions_csv(cls_run, tmp_path, monkeypatch):
  """predictions.csv appears whole or not at all (its rows go to a temporary file renamed at the end)."""
  wd, _ = cls_run
  d = tmp_path / "in"
  d.mkdir()
  for i in range(5):
    Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(d / f"{i}.png")
  real_add = predict._Writer.add

  def add_then_die(self, item, result, image):
    if item.name == "3.png":
      raise RuntimeError("killed")
    return real_add(self, item, result, image)

  monkeypatch.setattr(predict._Writer, "add", add_then_die)
  with pytest.raises(RuntimeError, match="killed"):
    predict.main([str(wd), str(d), str(tmp_path / "out"), "--batch-size", "8", "--no-progress"])
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
  monkeypatch.undo()
  predict.main([str(wd), str(d), str(tmp_path / "out2"), "--batch-size", "8", "--no-progress"])
  assert len(read_csv(tmp_path / "out2" / "predictions.csv")) == 5
