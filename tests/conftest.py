"""Test set-up: 8 fake CPU devices and one persistent XLA compilation cache (set before jax is imported), and the
shared-data locator."""
import atexit
import csv
import io
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the CLI subprocesses they start) compile the same small train / eval steps: a cache for the session
# compiles each once (tests/test_workdir.py: 431 -> 302 s). Your own JAX_COMPILATION_CACHE_DIR is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="tpp_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _XLA_CACHE, True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
import pathlib

import numpy as np
import pytest
from PIL import Image

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
SMOKE_CLI = ["--config", "configs/experiment.py:pneumonia,smoke,px32"]  # the smallest real-data CLI run


def load_config(name: str, arg: str | None = None):
  """get_config(arg) of configs/NAME.py, as `--config configs/NAME.py:ARG` would."""
  from tpp_jax.config import load_config_file
  return load_config_file(f"{ROOT / 'configs' / name}.py" + (f":{arg}" if arg else ""))


def run_cli(args, cwd=None, timeout=600, env=None, fault=None):
  """Run `python -m tpp_jax.main ARGS` in a fresh process (8 fake CPU devices; `env`: extra variables); with
  `fault` ('<workdir name>:<event>:<step>[:<signal>]') through tests/fault_inject.py, which kills it there."""
  import subprocess
  import sys
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu", **(env or {})}
  entry = ["-m", "tpp_jax.main"] if fault is None else [str(ROOT / "tests" / "fault_inject.py"), fault]
  return subprocess.run([sys.executable, *entry, *args], cwd=cwd or ROOT, env=env,
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


def tiny_npz(path, images, labels):
  """An npz with the same images / labels in its train, val and test splits."""
  np.savez(path, **{f"{s}_images": images for s in ("train", "val", "test")},
           **{f"{s}_labels": labels for s in ("train", "val", "test")})
  return path


def write_seg(root, rows, size=(16, 12), mask_values=(0, 255)):
  """A segmentation folder (images/, masks/, split.csv) with one random image + mask per split name in `rows`."""
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  rng = np.random.default_rng(0)
  with open(root / "split.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image", "mask", "split"])
    for i, split in enumerate(rows):
      img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
      mask = rng.choice(np.asarray(mask_values, np.uint8), (size[1], size[0]))
      Image.fromarray(img).save(root / "images" / f"{i}.png")
      Image.fromarray(mask).save(root / "masks" / f"{i}.png")
      w.writerow([f"images/{i}.png", f"masks/{i}.png", split])


def jpeg_bytes(img):
  """JPEG (quality 95) bytes of a uint8 image, as a uint8 array."""
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return np.frombuffer(buf.getvalue(), np.uint8)


@pytest.fixture
def sp_stats():
  """scipy.stats, the independent reference of the paired statistics (skipped without scipy outside CI)."""
  try:
    from scipy import stats
  except ImportError:
    if os.environ.get("CI", "").lower() == "true":
      raise
    pytest.skip("scipy (the reference for the paired statistics) is not installed: pip install scipy")
  return stats


def torch_sdpa(q, k, v, w):
  """torch's scaled_dot_product_attention in float64 on (B, T, H, D) arrays: the output and the gradients of
  sum(out * w), as (B, T, H, D) arrays."""
  torch = pytest.importorskip("torch")
  tq, tk, tv = (torch.tensor(a, dtype=torch.float64).transpose(1, 2).requires_grad_() for a in (q, k, v))
  ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)  # (B, H, T, D)
  (ref * torch.tensor(w, dtype=torch.float64).transpose(1, 2)).sum().backward()
  return ref.detach().transpose(1, 2).numpy(), [t.grad.transpose(1, 2).numpy() for t in (tq, tk, tv)]


def check_attention_against_torch(fn, shape, seed):
  """fn(q, k, v) (softmax attention of (B, T, H, D) float32 arrays) and its q, k, v gradients against torch_sdpa."""
  import jax
  rng = np.random.default_rng(seed)
  q, k, v, w = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
  out = jax.jit(fn)(q, k, v)
  grads = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
  ref, ref_grads = torch_sdpa(q, k, v, w)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for g, tg in zip(grads, ref_grads):
    np.testing.assert_allclose(g, tg, rtol=1e-4, atol=1e-5)
