"""The Python API (tpp_jax.__init__ / tpp_jax.api): the version, lazy names, load_config with overrides, train = the
CLI's job, load_run(...).predict = what `python -m tpp_jax.predict` writes (also in tests/data/test_medical.py for
DICOM, 16-bit and float inputs)."""
import csv
import importlib.metadata
import json
import subprocess
import sys

import numpy as np
from PIL import Image

import tpp_jax
from tpp_jax import predict

from conftest import CLS_RUN_ARG, ROOT, load_config


def test_version_is_the_installed_distributions_and_import_stays_light():
  assert tpp_jax.__version__ == importlib.metadata.version("tpp_jax")
  r = subprocess.run([sys.executable, "-c", "import sys, tpp_jax; print(tpp_jax.__version__, 'jax' in sys.modules)"],
                     capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert r.returncode == 0 and r.stdout.split() == [tpp_jax.__version__, "False"], r.stdout + r.stderr


def test_load_config_overrides_fields_as_the_cli_does():
  c = tpp_jax.load_config("configs/experiment.py:demo,smoke", steps=7, optim__lr=2e-3, data__path="x.npz")
  assert (c.steps, c.optim.lr, c.data.path, c.stage) == (7, 2e-3, "x.npz", "finetune")


def test_train_is_the_clis_run_and_predict_equals_the_predict_cli(cls_run, tmp_path, capsys):
  wd, _ = cls_run
  # the shared run's own config, given to train: finished, nothing trained, its summary returned (the CLI's
  # "nothing to do")
  summary = tpp_jax.train(load_config("experiment", CLS_RUN_ARG), wd)
  assert "nothing to do" in capsys.readouterr().out
  assert summary == json.loads((wd / "summary.json").read_text())
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (32, 32), dtype=np.uint8), rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)]
  (tmp_path / "in").mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(tmp_path / "in" / f"{i}.png")
  predict.main([str(wd), str(tmp_path / "in"), str(tmp_path / "out"), "--no-progress"])
  with open(tmp_path / "out" / "predictions.csv") as f:
    rows = list(csv.DictReader(f))
  names = [k for k in rows[0] if k.startswith("prob_")]
  cli = np.asarray([[float(r[k]) for k in names] for r in rows])
  run = tpp_jax.load_run(wd)
  assert run.task == "classification" and [f"prob_{n}" for n in run.class_names] == names
  got = run.predict(images)  # arrays
  assert got.shape == (2, len(names)) and np.abs(got - cli).max() < 1e-6
  assert np.abs(run.predict([tmp_path / "in" / "0.png", str(tmp_path / "in" / "1.png")]) - cli).max() < 1e-6
