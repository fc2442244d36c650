"""Test set-up: 8 fake CPU devices and one persistent XLA compilation cache (set before jax is imported), and the
shared-data locator."""
import atexit
import csv
import io
import itertools
import json
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the CLI subprocesses they start) compile the same small train / eval steps: a cache for the session
# compiles each once. Your own JAX_COMPILATION_CACHE_DIR is kept.
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


def holm_by_closed_testing(p):
  """Holm's adjusted p-values by their other definition, the reference for stats.holm: closed testing with
  Bonferroni local tests. H_i's adjusted p is the largest, over every subset S holding i, of |S| * min(p_j, j in S)
  (capped at 1): a brute force over all subsets."""
  m = len(p)
  out = []
  for i in range(m):
    worst = 0.0
    for k in range(1, m + 1):
      for s in itertools.combinations(range(m), k):
        if i in s:
          worst = max(worst, min(1.0, k * min(p[j] for j in s)))
    out.append(worst)
  return out


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


# ------------------------------------------------------------------------------------------------------------------
# Runs trained once per test session and read by several test files (each file no longer trains its own copy)
# ------------------------------------------------------------------------------------------------------------------

def shared_run(tmp_path_factory, name: str, make) -> pathlib.Path:
  """The folder of a run made once per session: the first test to ask calls `make(folder)` under a file lock; every
  other test, in any pytest-xdist worker, gets the finished folder. Tests must not change what they read there."""
  from filelock import FileLock
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: .../pytest-N/popen-gwK
  folder = root / "shared_runs" / name
  folder.parent.mkdir(parents=True, exist_ok=True)
  with FileLock(str(folder.parent / f"{name}.lock")):
    if not (folder.parent / f"{name}.done").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      make(folder)
      (folder.parent / f"{name}.done").touch()
  return folder


# configs/default.py:smoke with every comparison arm: the brackets (linear probe, full fine-tune), the compute-matched
# baseline and a 25 % label fraction, evaluated every step
SMOKE_PIPELINE_ARG = ("smoke,pipeline.brackets=True,eval_every=1,pipeline.compute_matched=True,"
                      "pipeline.label_fractions=(0.25,1.0)")
SMOKE_PIPELINE_ARMS = ("tpp", "tpp_finetune", "baseline", "baseline_matched", "linear", "full",
                       *(f"frac_0.25/{a}" for a in ("tpp_finetune", "baseline", "baseline_matched", "linear", "full")))


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory) -> pathlib.Path:
  """The product's front door through the CLI, trained once for the pipeline, bracket, label-efficiency and
  shared-control tests: the default smoke pipeline (house backbone) with every arm of SMOKE_PIPELINE_ARMS and
  report.md. Tests read it; one that changes a pipeline works on a copy."""
  def make(folder):
    r = run_cli(["--config", f"configs/default.py:{SMOKE_PIPELINE_ARG}", "--workdir", str(folder / "run")])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
  return shared_run(tmp_path_factory, "smoke_pipeline", make) / "run"


def seg_folder(root: pathlib.Path, n: int = 40, size: int = 32) -> pathlib.Path:
  """A segmentation folder of `n` noise images with a bright square (the mask), split train, train, val, test."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  rows = ["image,mask,split"]
  for i in range(n):
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    y, x = rng.integers(4, size - 12, 2)
    mask[y:y + 10, x:x + 10] = 255
    img[mask > 0] = 230  # a bright square to segment
    Image.fromarray(img).save(root / "images" / f"{i}.png")
    Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    rows.append(f"images/{i}.png,masks/{i}.png,{('train', 'train', 'val', 'test')[i % 4]}")
  (root / "split.csv").write_text("\n".join(rows) + "\n")
  return root


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(run folder, data folder) of a 2-step segmentation fine-tune on `seg_folder` (32 px)."""
  def make(folder):
    from tpp_jax import engine
    c = load_config("experiment", "kvasir,smoke,px32,steps=2,eval_every=0,checkpoint_every=0")
    c.data.path = str(seg_folder(folder / "data"))
    engine.train(c, folder / "run")
  folder = shared_run(tmp_path_factory, "seg_run", make)
  return folder / "run", folder / "data"


CLS_RUN_ARG = ("demo,smoke,px32,stage=full,steps=30,optim.lr=3e-3,optim.warmup_steps=5,task.class_weights=True,"
               "data.max_eval_examples=0,eval_splits=('test',)")


@pytest.fixture(scope="session")
def cls_run(tmp_path_factory) -> tuple[pathlib.Path, dict]:
  """(run folder, its eval.json test metrics) of a tiny classification run on the shipped demo X-rays (full
  fine-tune, class weights: both classes get predicted), evaluated on the whole test split by its `eval` stage
  through the CLI."""
  def make(folder):
    from tpp_jax import main
    c = load_config("experiment", CLS_RUN_ARG)
    main.run(c, str(folder / "run"))
    r = run_cli(["--config", "configs/experiment.py:stage=eval,eval_splits=('test',),eval_checkpoint=latest",
                 "--workdir", str(folder / "run")])
    assert r.returncode == 0, r.stderr[-3000:]
  wd = shared_run(tmp_path_factory, "cls_run", make) / "run"
  return wd, json.loads((wd / "eval.json").read_text())["results"]["test"]
