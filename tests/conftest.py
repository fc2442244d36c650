"""Test set-up: 8 fake CPU devices (set before jax is imported) and the shared-data locator."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> pathlib.Path:
  """Path under ../shared; skip (or fail when CI=true) if it is absent."""
  p = SHARED.joinpath(*parts)
  if not p.exists():
    msg = (f"{p} not found: the shared data folder must sit beside the repository "
           "(../shared). See README 'Tests'.")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg + " CI=true, so this is a failure, not a skip.")
    pytest.skip(msg)
  return p


@pytest.fixture
def pneumonia_npz() -> pathlib.Path:
  return shared_path("data", "pneumonia_cxr_128", "pneumonia_cxr_128.npz")


@pytest.fixture
def kvasir_dir() -> pathlib.Path:
  return shared_path("data", "kvasir_seg_256")


ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """get_config(arg) of configs/NAME.py, as `--config configs/NAME.py:ARG` would."""
  from tpp_jax.config import load_config_file
  return load_config_file(f"{ROOT / 'configs' / name}.py" + (f":{arg}" if arg else ""))


def run_cli(args, cwd=None, timeout=600, env=None):
  """Run `python -m tpp_jax.main ARGS` in a fresh process (8 fake CPU devices; `env`: extra variables)."""
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", "tpp_jax.main", *args], cwd=cwd or ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def house_smoke_config():
  """configs/house_backbone.py:smoke on the shared natural photographs, 64 held out, eval on val."""
  c = load_config("house_backbone", "smoke")
  c.data.path = str(shared_path("data", "pretrain_natural_64", "images_jpeg.npz"))
  c.data.val_count = 64
  c.eval_splits = ("val",)
  return c


def one_error_line(r, rc: int = 2) -> str:
  """The CLI contract for a user mistake (DESIGN.md §3 'Errors') on a finished `run_cli` result: exit code `rc`,
  no traceback, exactly one `error:` line on stderr. Returns that line."""
  out = r.stdout + r.stderr
  assert r.returncode == rc, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, r.stderr[-2000:]
  return errors[0]
