"""launch/colab_tpu.ipynb runs top to bottom in TINY mode on CPU, its own install path included, so a broken notebook
fails CI.

No Jupyter here: the code cells run in order in one namespace, as a kernel would, after a small documented
translation of IPython's syntax:
  `!CMD`           -> a bash subprocess, `{expr}` expanded in the notebook namespace (as IPython does); unlike
                      IPython a non-zero exit FAILS the test (a silently broken command). One exception: the
                      accelerator's `pip install -q -U "jax[tpu|cudaNN]"` (only reached when the machine has a TPU
                      or GPU) is recorded, not run: it needs the network, and the runs below use CPU JAX anyway.
  `%cd DIR`        -> os.chdir (restored afterwards), recorded as a command; any other `%magic` fails the test.
  IPython.display  -> a stub that records what would be displayed (images must exist on disk).

The kernel is a throw-away virtual environment without tpp_jax: sys.executable, and `python` / `pip` on PATH, are
its interpreter (`pip` = `python -m pip`). Its dependencies are this environment's site-packages less tpp_jax, added
after its own site-packages by a .pth file (`venv --system-site-packages` would add the BASE interpreter's packages,
not this venv's). PIP_NO_INDEX=1 and PIP_NO_BUILD_ISOLATION=0 (pip's inverted spelling of --no-build-isolation:
an isolated build would download setuptools) let the notebook's unchanged `pip install -q -e .` run offline and
install only tpp_jax, editable, from the clone.

The notebook starts in a folder that is not a checkout (Colab's /content), with the settings cell then overridden:
TINY=True, REPO_URL=this repository's file:// URL, REPO_REF=its HEAD commit, REPO_DIR=a temporary folder. So its
own cells `git clone` + `git checkout` + `%cd` + `pip install -e .`, and the demo's `python -m tpp_jax.main` runs
the clone's package, as on Colab. A clone holds the COMMITTED state (HEAD): the package under test is HEAD's, while
the cells run are those of the notebook file in the working tree, as a user opens a notebook and gets the package
from git. In CI (a clean checkout) both are the same commit; while you develop, an uncommitted notebook edit is
tested but an uncommitted package edit is not (the other tests cover the working tree). Not a git checkout (an
unpacked sdist): skipped. XLA_FLAGS is dropped so the runs see one CPU device, like a CPU runtime. The optional
cells stay off (their switches default to False; this is checked). Rerunning the cells up to the install cell then
takes the "using the checkout" branch (the kernel's folder is now the clone) and installs nothing. One clone, venv
and run for the module: ~10 s of CPU more than the bare TINY run (clone ~1 s, pip ~4 s, pip show and probes).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import time
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"
MAGIC_RE = re.compile(r"^(\s*)([!%])(.*)$")
ACCELERATOR_JAX_RE = re.compile(r'pip install -q -U "jax\[(tpu|cuda\d+)\]"')


def _code_cells() -> list[str]:
  nb = json.loads(NOTEBOOK.read_text())
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def to_python(source: str) -> str:
  """IPython cell source -> Python: `!cmd` -> _nb_shell('cmd'), `%name args` -> _nb_magic('name', 'args')."""
  assert not source.lstrip().startswith("%%"), "cell magics are not supported by this test"
  out = []
  for line in source.splitlines():
    m = MAGIC_RE.match(line)
    if not m:
      out.append(line)
    elif m.group(2) == "!":
      out.append(f"{m.group(1)}_nb_shell({m.group(3)!r})")
    else:
      name, _, args = m.group(3).partition(" ")
      out.append(f"{m.group(1)}_nb_magic({name!r}, {args.strip()!r})")
  return "\n".join(out) + "\n"


def _expand(cmd: str, ns: dict) -> str:
  """IPython's `{expr}` expansion in `!` commands ('{{' / '}}' are literal braces)."""
  return re.sub(r"(?<!\{)\{([^{}]+)\}(?!\})", lambda m: str(eval(m.group(1), ns)), cmd)  # noqa: S307


class _Display:
  def __init__(self):
    self.shown = []

  def module(self) -> types.ModuleType:
    mod = types.ModuleType("IPython.display")

    def markdown(text):
      return ("markdown", text)

    def image(filename=None, **_):
      assert filename and pathlib.Path(filename).is_file(), f"Image({filename!r}): no such file"
      return ("image", filename)

    mod.Markdown, mod.Image, mod.display = markdown, image, lambda *objs: self.shown.extend(objs)
    return mod


def run_notebook(overrides: dict, monkeypatch, upto: int | None = None) -> tuple[dict, list[str], _Display]:
  """Execute the first `upto` code cells (all by default) in order in the current environment and folder;
  `overrides` are applied right after the first (settings) cell."""
  shown = _Display()
  ipython = types.ModuleType("IPython")
  ipython.display = shown.module()
  monkeypatch.setitem(sys.modules, "IPython", ipython)
  monkeypatch.setitem(sys.modules, "IPython.display", ipython.display)
  commands: list[str] = []
  ns: dict = {"__name__": "__main__"}

  def shell(cmd):
    cmd = _expand(cmd, ns)
    commands.append(cmd)
    if ACCELERATOR_JAX_RE.fullmatch(cmd):
      return
    r = subprocess.run(["bash", "-c", cmd], env=dict(os.environ), capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, f"!{cmd}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"

  def magic(name, args):
    if name != "cd":
      raise NotImplementedError(f"%{name} reached in the notebook test")
    commands.append(f"%cd {_expand(args, ns)}")
    os.chdir(_expand(args, ns))

  ns.update(_nb_shell=shell, _nb_magic=magic)
  for i, src in enumerate(_code_cells()[:upto]):
    exec(compile(to_python(src), f"{NOTEBOOK.name}[code cell {i}]", "exec"), ns)  # noqa: S102
    if i == 0:
      ns["_settings"] = {k: ns[k] for k in overrides}
      ns.update(overrides)
  return ns, commands, shown


def _throwaway_venv(path: pathlib.Path) -> pathlib.Path:
  """A venv without tpp_jax on top of this environment's packages; returns its python."""
  path = path.resolve()
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
  python = path / "bin" / "python"
  site = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     check=True, capture_output=True, text=True).stdout.strip())
  deps = path / "deps"  # this environment's site-packages, less tpp_jax (its dist-info, editable finder and .pth)
  deps.mkdir()
  for folder in {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}:
    for entry in pathlib.Path(folder).iterdir():
      if "tpp_jax" not in entry.name.lower() and not (deps / entry.name).exists():
        (deps / entry.name).symlink_to(entry)
  (site / "_test_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
  pip = path / "bin" / "pip"
  pip.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n')
  pip.chmod(0o755)
  return python


def _install_cells() -> int:
  """How many code cells run up to and including the install cell."""
  return 1 + next(i for i, s in enumerate(_code_cells()) if "git clone" in s)


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
  """The notebook run TINY on CPU from a non-checkout folder (cloning + installing itself), then its set-up rerun."""
  if not (ROOT / ".git").exists():
    pytest.skip("not a git checkout: nothing for the notebook to clone")
  tmp = tmp_path_factory.mktemp("colab")
  python = _throwaway_venv(tmp / "venv")
  content = tmp / "content"  # Colab's /content: not a checkout
  content.mkdir()
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True,
                        text=True).stdout.strip()
  overrides = {"TINY": True, "REPO_URL": ROOT.as_uri(), "REPO_REF": head, "REPO_DIR": str(content / "tpp_jax")}
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(content)
    mp.setattr(sys, "executable", str(python))  # the kernel's interpreter
    mp.setenv("PATH", str(python.parent) + os.pathsep + os.environ["PATH"])
    mp.setenv("VIRTUAL_ENV", str(python.parent.parent))
    mp.delenv("PYTHONPATH", raising=False)
    mp.delenv("XLA_FLAGS", raising=False)  # one CPU device, like a CPU runtime
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.setenv("PIP_NO_INDEX", "1")
    mp.setenv("PIP_NO_BUILD_ISOLATION", "0")  # = --no-build-isolation
    mp.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    t0 = time.time()
    ns, commands, shown = run_notebook(overrides, mp)
    elapsed = time.time() - t0
    cwd = pathlib.Path.cwd()
    rerun_ns, rerun_commands, _ = run_notebook(overrides, mp, upto=_install_cells())
  print(f"notebook (TINY, CPU, clone + pip install): {elapsed:.1f} s")
  return types.SimpleNamespace(ns=ns, commands=commands, shown=shown, cwd=cwd, python=python, head=head,
                               repo=content / "tpp_jax", rerun_ns=rerun_ns, rerun_commands=rerun_commands)


def test_settings_cell():
  settings = _code_cells()[0]
  ns: dict = {}
  exec(settings, ns)  # noqa: S102 - plain assignments
  assert "SET ME" in settings and "YOUR_USER" in ns["REPO_URL"]  # a clearly marked value the user sets
  assert ns["REPO_REF"] == "" and ns["REPO_DIR"] == "/content/tpp_jax"
  assert ns["TINY"] is False and ns["RUN_PIPELINE"] is True
  for flag in ("USE_DRIVE", "RUN_HOUSE_BACKBONE", "RUN_MAE_B16", "SHOW_TENSORBOARD"):
    assert ns[flag] is False, flag  # heavy / account-bound cells are opt-in


def test_heavy_commands_are_behind_flags_and_drive_is_mounted_first():
  cells = _code_cells()
  for i, src in enumerate(cells):
    for line in src.splitlines():
      if line.lstrip().startswith(("!", "%")):
        assert line.startswith((" ", "\t")), f"code cell {i}: {line!r} runs unconditionally"
  assert not re.search(r"^\s*assert .*tpu", "\n".join(cells), re.M | re.I), "the notebook must not assert a TPU"
  mount = next(i for i, s in enumerate(cells) if "drive.mount(" in s)
  assert re.search(r"^if USE_DRIVE:", cells[mount], re.M)
  drive_vars = ("NATURAL_NPZ", "MEDMNIST_NPZ", "DRIVE_RUNS")
  first_read = min(i for i, s in enumerate(cells[1:], 1) if any(v in s for v in drive_vars))
  assert mount < first_read, "Drive must be mounted before a cell reads a path on it"


def _mae_b16_cell() -> str:
  return next(s for s in _code_cells() if "mae_visualize_vit_base.pth" in s)


@pytest.mark.parametrize("backend,dtype", [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")])
def test_mae_b16_uses_bf16_only_on_an_accelerator(backend, dtype):
  ns = {"JAX_BACKEND": backend, "RUN_MAE_B16": False}
  exec(to_python(_mae_b16_cell()), ns)  # noqa: S102 - the switch is off: only the dtype is resolved
  assert ns["MAE_B16_DTYPE"] == dtype


def test_notebook_clones_installs_and_runs_tiny_on_cpu(colab):
  ns, commands, repo = colab.ns, colab.commands, colab.repo
  assert ns["BACKEND"] in ("cpu", "gpu", "tpu") and ns["JAX_BACKEND"] == "cpu" and ns["DTYPE"] == "float32"
  accelerator_jax = {"cpu": [], "tpu": ['pip install -q -U "jax[tpu]"'], "gpu": ['pip install -q -U "jax[cuda12]"']}
  main = "python -m tpp_jax.main --config configs/default.py:smoke --workdir runs/demo_tiny"
  assert commands == [f"git clone -q {ROOT.as_uri()} {repo}", f"git -C {repo} checkout -q {colab.head}", f"%cd {repo}",
                      "pip install -q -e .", *accelerator_jax[ns["BACKEND"]], main], commands
  assert colab.cwd == repo
  got = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
  assert got == colab.head
  demo = repo / "runs" / "demo_tiny"
  assert (demo / "report.md").is_file()
  kinds = [k for k, _ in colab.shown.shown]
  assert kinds == ["markdown", "image", "image"], kinds
  assert "tpp_finetune" in colab.shown.shown[0][1] and "baseline" in colab.shown.shown[0][1]
  assert [pathlib.Path(f).name for k, f in colab.shown.shown[1:]] == ["learning_curves.png", "mae_reconstructions.png"]
  # TensorBoard (the optional cell's logdir) has the TPP arm's reconstructions beside the scalars
  from test_tensorboard import read_events, summaries
  images = summaries(read_events(demo / "seed_0" / "tpp"), "image")
  assert [tag for tag, _ in images] == ["val/mae_reconstructions"]


def test_the_clone_is_the_package_the_notebook_ran(colab):
  repo = colab.repo
  # the CLI resolved the packaged demo data and backbone inside the clone's tpp_jax, not this checkout's
  config = json.loads((repo / "runs" / "demo_tiny" / "config.json").read_text())
  for path in (config["data"]["path"], config["init"]["path"]):
    assert pathlib.Path(path).is_relative_to(repo / "tpp_jax" / "assets") and pathlib.Path(path).is_file(), path
  # the notebook's pip installed tpp_jax into the throw-away venv, editable from the clone: imported from elsewhere
  # (not the clone's folder), its python finds the clone's package
  site = next((colab.python.parent.parent / "lib").glob("python*/site-packages"))
  (dist,) = site.glob("tpp_jax-*.dist-info")
  direct_url = json.loads((dist / "direct_url.json").read_text())
  assert direct_url["url"] == repo.as_uri() and direct_url["dir_info"].get("editable"), direct_url
  code = "import tpp_jax, tpp_jax.configs; print(tpp_jax.__file__); print(tpp_jax.configs.__file__)"
  r = subprocess.run([str(colab.python), "-c", code], cwd=colab.python.parent, capture_output=True, text=True,
                     env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  module, configs = r.stdout.split()
  assert pathlib.Path(module) == repo / "tpp_jax" / "__init__.py", module
  assert pathlib.Path(configs) == repo / "configs" / "__init__.py", configs


def test_mae_b16_cell_resolves_float32_on_cpu(colab):
  ns = colab.ns
  assert ns["RUN_MAE_B16"] is False and not any("mae_b16" in c for c in colab.commands)  # optional: stays off
  assert ns["MAE_B16_DTYPE"] == "float32"
  (main,) = [line.strip()[1:] for line in _mae_b16_cell().splitlines() if "-m tpp_jax.main" in line]
  resolved = _expand(main, ns)
  assert "--config.model.dtype=float32" in resolved and "bfloat16" not in resolved, resolved


def test_rerunning_the_install_cell_uses_the_checkout_and_installs_nothing(colab):
  # the kernel's folder is now the clone: "using the checkout" (no clone, no %cd), and tpp_jax is installed (no pip)
  assert colab.rerun_commands == [], colab.rerun_commands
  assert colab.rerun_ns["BACKEND"] == colab.ns["BACKEND"]
