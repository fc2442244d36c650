"""launch/colab_tpu.ipynb runs top to bottom in TINY mode on CPU, so a broken notebook fails CI.

No Jupyter here: the code cells run in order in one namespace, as a kernel would, after a small documented
translation of IPython's syntax:
  `!CMD`           -> a bash subprocess, `{expr}` expanded in the notebook namespace (as IPython does), `python` =
                      this interpreter; unlike IPython a non-zero exit FAILS the test (a silently broken command).
  `%cd DIR`        -> os.chdir (restored afterwards); any other `%magic` fails the test if it is reached.
  IPython.display  -> a stub that records what would be displayed (images must exist on disk).
The notebook runs from the repository root ("using the checkout": no clone, no pip), with the settings cell
then overridden: TINY=True, RUNS=a temporary folder. XLA_FLAGS is dropped so the runs see one CPU device, like a
CPU runtime. The optional cells stay off (their switches default to False; this is checked).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"
MAGIC_RE = re.compile(r"^(\s*)([!%])(.*)$")


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


def run_notebook(overrides: dict, monkeypatch) -> tuple[dict, list[str], _Display]:
  """Execute the code cells in order; `overrides` are applied right after the first (settings) cell."""
  shown = _Display()
  ipython = types.ModuleType("IPython")
  ipython.display = shown.module()
  monkeypatch.setitem(sys.modules, "IPython", ipython)
  monkeypatch.setitem(sys.modules, "IPython.display", ipython.display)
  env = dict(os.environ, PATH=str(pathlib.Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
  commands: list[str] = []
  ns: dict = {"__name__": "__main__"}

  def shell(cmd):
    cmd = _expand(cmd, ns)
    commands.append(cmd)
    r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, f"!{cmd}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"

  def magic(name, args):
    if name != "cd":
      raise NotImplementedError(f"%{name} reached in the notebook test")
    os.chdir(_expand(args, ns))

  ns.update(_nb_shell=shell, _nb_magic=magic)
  for i, src in enumerate(_code_cells()):
    exec(compile(to_python(src), f"{NOTEBOOK.name}[code cell {i}]", "exec"), ns)  # noqa: S102
    if i == 0:
      ns["_settings"] = {k: ns[k] for k in overrides}
      ns.update(overrides)
  return ns, commands, shown


def test_settings_cell():
  settings = _code_cells()[0]
  ns: dict = {}
  exec(settings, ns)  # noqa: S102 - plain assignments
  assert "SET ME" in settings and "YOUR_USER" in ns["REPO_URL"]  # a clearly marked value the user sets
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


def test_notebook_runs_tiny_on_cpu(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)  # the notebook opened inside a checkout: no clone, no pip install
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, like a CPU runtime
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  runs = tmp_path / "runs"
  t0 = time.time()
  ns, commands, shown = run_notebook({"TINY": True, "RUNS": str(runs)}, monkeypatch)
  elapsed = time.time() - t0
  print(f"notebook (TINY, CPU): {elapsed:.1f} s")
  assert ns["BACKEND"] in ("cpu", "gpu", "tpu") and ns["JAX_BACKEND"] == "cpu" and ns["DTYPE"] == "float32"
  assert not any(c.startswith(("git ", "pip ")) for c in commands), commands
  mains = [c for c in commands if "-m tpp_jax.main" in c]
  assert mains == [f"python -m tpp_jax.main --config configs/default.py:smoke --workdir {runs}/demo_tiny"], commands
  demo = runs / "demo_tiny"
  assert (demo / "report.md").is_file()
  kinds = [k for k, _ in shown.shown]
  assert kinds == ["markdown", "image", "image"], kinds
  assert "tpp_finetune" in shown.shown[0][1] and "baseline" in shown.shown[0][1]
  assert [pathlib.Path(f).name for k, f in shown.shown[1:]] == ["learning_curves.png", "mae_reconstructions.png"]
  # TensorBoard (the optional cell's logdir) has the TPP arm's reconstructions beside the scalars
  from test_tensorboard import read_events, summaries
  images = summaries(read_events(demo / "seed_0" / "tpp"), "image")
  assert [tag for tag, _ in images] == ["val/mae_reconstructions"]
