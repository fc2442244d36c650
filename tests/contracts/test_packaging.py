"""`pip install .` outside a checkout: the wheel ships the configs and assets, and `tpp-jax` runs with them.

The wheel is built from a copy of the sources (building in the checkout would write build/ and *.egg-info
there) with `pip wheel --no-deps --no-build-isolation --no-index` and installed with `pip install --target`;
the dependencies come from the running environment. Every command then runs in a temporary folder that is
not the checkout, so `configs/NAME.py` there can only be the installed tpp_jax/configs copy. ~15 s.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ("default", "experiment", "house_backbone", "presets")


def _pip(*args, cwd):
  r = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=180)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(wheel, target folder) of a no-deps build + install of this checkout."""
  tmp = tmp_path_factory.mktemp("packaging")
  src = tmp / "src"
  for folder in ("tpp_jax", "configs"):  # configs/ is the package tpp_jax.configs (pyproject package-dir)
    shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src), cwd=tmp)
  wheels = list((tmp / "dist").glob("tpp_jax-*.whl"))
  assert len(wheels) == 1, wheels
  _pip("install", "-q", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheels[0]), cwd=tmp)
  cwd = tmp / "elsewhere"
  cwd.mkdir()
  return wheels[0], tmp / "site", cwd


def _env(site: pathlib.Path) -> dict:
  # the installed copy first; the dependencies from this environment's site-packages (sys.executable's)
  return dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu", XLA_FLAGS="")


def test_wheel_has_configs_assets_and_console_script(installed):
  wheel, _, _ = installed
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
  for name in CONFIGS + ("__init__",):
    assert f"tpp_jax/configs/{name}.py" in names, name
  assert "tpp_jax/assets/demo_cxr_64/demo_cxr_64.npz" in names
  assert "tpp_jax/assets/house_vit_ti8_64/house_vit_ti8_64.safetensors" in names
  assert not any(n.endswith((".cc", ".so")) for n in names)  # no native code
  assert "[console_scripts]" in entry_points and "tpp-jax = tpp_jax.main:entry" in entry_points
  assert not any(n.startswith(("configs/", "tests/")) for n in names)


def test_packaged_configs_resolve_outside_the_checkout(installed):
  _, site, cwd = installed
  code = ("import json, tpp_jax; from tpp_jax.config import load_config_file; "
          "c = load_config_file('configs/default.py:smoke'); e = load_config_file('experiment.py:demo,house'); "
          "print(json.dumps([tpp_jax.__file__, c.stage, c.init.path, c.data.path, e.data.path]))")
  r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(site), capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  module, stage, init, data, data2 = json.loads(r.stdout.strip().splitlines()[-1])
  assert pathlib.Path(module).is_relative_to(site), module  # the installed copy, not the checkout's
  assert stage == "pipeline"
  for p in (init, data, data2):
    assert pathlib.Path(p).is_relative_to(site / "tpp_jax" / "assets") and pathlib.Path(p).is_file(), p


def test_console_script_runs_a_shipped_config(installed):
  _, site, cwd = installed
  exe = site / "bin" / "tpp-jax"
  assert exe.is_file()
  run = cwd / "run"
  r = subprocess.run([str(exe), "--config", "configs/experiment.py:demo,smoke,stage=linear,steps=2,"
                      "data.max_train_examples=32,data.max_eval_examples=32", "--workdir", str(run),
                      "--config.eval_splits=('val',)"],
                     cwd=cwd, env=_env(site), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  summary = json.loads((run / "summary.json").read_text())
  assert summary["stage"] == "linear" and summary["steps"] == 2
  assert "accuracy" in summary["final"]["val"]
  assert pathlib.Path(summary["config"]["data"]["path"]).is_relative_to(site)


def test_console_script_errors_are_one_line(installed):
  _, site, cwd = installed
  exe = str(site / "bin" / "tpp-jax")
  for args, want in ((["--config", "configs/nope.py"], "shipped configs"),
                     (["--config", "configs/default.py:smoke", "--config.peft.rnk=4"], "Did you mean 'rank'"),
                     (["--config", "configs/experiment.py:demo,nosuchpreset"], "Unknown config argument")):
    r = subprocess.run([exe, *args, "--workdir", str(cwd / "bad")], cwd=cwd, env=_env(site),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and want in errors[0], r.stderr[-2000:]


def test_pyproject_lists_every_package():
  """pyproject.toml names its packages (configs/ is mapped in as tpp_jax.configs): a new subpackage must be added."""
  import tomllib
  listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
  found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tpp_jax").rglob("__init__.py")}
  assert listed == found | {"tpp_jax.configs"}, listed ^ (found | {"tpp_jax.configs"})
