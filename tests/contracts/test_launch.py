"""The launch files (launch/): notebook structure, every config and preset they name, shell syntax.

Fast and offline: nothing is trained or installed; commands are parsed, and the literal ones are resolved
with the real config files (get_config + the --config.x overrides + validate).
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
CONFIGS = ROOT / "configs"
NOTEBOOK = LAUNCH / "colab_tpu.ipynb"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
MINE = [LAUNCH / "tpu_pod.sh", LAUNCH / "slurm.sh"]

# configs/NAME.py[:ARG] inside a shlex token; ARG stops at whitespace, quotes or a closing brace (${VAR:-configs/x.py}).
CONFIG_RE = re.compile(r"configs/(\w+)\.py(?::([^\s}\"'`]*))?")
MAIN_RE = re.compile(r"\bpython3?\s+-m\s+tpp_jax\.main\b")
KEY_VALUE_RE = re.compile(r"^[A-Za-z_][\w.]*=")


def _presets() -> dict:
  sys.path.insert(0, str(CONFIGS))
  try:
    spec = importlib.util.spec_from_file_location("_launch_test_presets", CONFIGS / "presets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  finally:
    sys.path.remove(str(CONFIGS))
  return mod.PRESETS


PRESETS = _presets()


def _notebook() -> dict:
  return json.loads(NOTEBOOK.read_text())


def _source(cell) -> str:
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def _shell_vars(text: str) -> dict[str, str]:
  """Simple assignments of a script: VAR=value, VAR="value", VAR=${VAR:-default}, VAR=${1:-default}."""
  out = {}
  for m in re.finditer(r"^\s*(?:export\s+|local\s+)?([A-Za-z_]\w*)=(.*)$", text, re.M):
    name, value = m.group(1), m.group(2).strip()
    d = re.fullmatch(r"\$\{\w+:-([^}]*)\}(\s+#.*)?", value)
    if d:
      value = d.group(1)
    elif value[:1] in "\"'" and value.count(value[0]) >= 2:
      value = value[1:value.index(value[0], 1)]
    elif "$" in value or "`" in value or value.startswith("("):
      continue
    else:
      value = value.split("#")[0].strip()
    out.setdefault(name, value)
  return out


def _substitute(text: str, variables: dict[str, str]) -> str:
  def sub(m):
    return variables.get(m.group(1) or m.group(2), m.group(0))
  for _ in range(4):  # variables that name variables
    text = re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)
  return text


def _logical_lines(text: str) -> list[str]:
  return text.replace("\\\n", " ").splitlines()


def _tokens(line: str) -> list[str]:
  line = line.strip().lstrip("#!").strip()
  try:
    return shlex.split(line)
  except ValueError:  # unbalanced quotes in a comment: whitespace split is enough there
    return line.split()


def _file_lines() -> list[tuple[str, str]]:
  """(where, logical line) of the notebook's code cells and of every launch/*.sh, shell variables expanded."""
  rows = []
  for i, cell in enumerate(_notebook()["cells"]):
    if cell["cell_type"] == "code":
      rows += [(f"{NOTEBOOK.name} cell {i}", line) for line in _logical_lines(_source(cell))]
  for script in SCRIPTS:
    text = script.read_text()
    text = _substitute(text, _shell_vars(text))
    rows += [(script.name, line) for line in _logical_lines(text)]
  return rows


def _config_mentions() -> list[tuple[str, str, str | None]]:
  found = []
  for where, line in _file_lines():
    for tok in _tokens(line):
      for m in CONFIG_RE.finditer(tok):
        found.append((where, m.group(1), m.group(2)))
  return found


def _main_commands() -> list[tuple[str, list[str]]]:
  cmds = []
  for where, line in _file_lines():
    if MAIN_RE.search(line) and not line.lstrip().startswith("#"):
      toks = _tokens(line)
      start = next(i for i, t in enumerate(toks) if t == "tpp_jax.main")
      cmds.append((where, toks[start + 1:]))
  return cmds


# --------------------------------------------------------------------------------------------- notebook


def test_notebook_is_nbformat4():
  nb = _notebook()
  assert nb["nbformat"] == 4 and isinstance(nb.get("nbformat_minor"), int)
  assert isinstance(nb["metadata"], dict)
  assert isinstance(nb["cells"], list) and len(nb["cells"]) >= 6
  for i, cell in enumerate(nb["cells"]):
    assert cell["cell_type"] in ("markdown", "code", "raw"), i
    assert isinstance(cell["metadata"], dict), i
    assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"]), i
    assert all(s.endswith("\n") for s in cell["source"][:-1]), f"cell {i}: source lines end with a newline"
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, i
    else:
      assert "outputs" not in cell and "execution_count" not in cell, i
  if nb.get("nbformat_minor", 0) >= 5:
    ids = [c.get("id") for c in nb["cells"]]
    assert all(ids) and len(set(ids)) == len(ids)
  try:
    import nbformat  # optional: the reference validator when installed
  except ImportError:
    return
  nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))


def test_notebook_content():
  nb = _notebook()
  assert nb["cells"][0]["cell_type"] == "markdown"
  assert "TPU" in _source(nb["cells"][0])
  code = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "code")
  assert 'pip install -q -U "jax[tpu]"' in code
  assert "REPO_URL =" in code and "git clone" in code and "pip install -q -e ." in code
  assert "jax.devices()" in code
  assert "--config.model.dtype={MAE_B16_DTYPE}" in code  # bf16 only on an accelerator
  assert 'MAE_B16_DTYPE = "float32" if JAX_BACKEND == "cpu" else "bfloat16"' in code
  assert "report.md" in code and "learning_curves.png" in code and "Markdown(" in code and "Image(" in code
  assert "configs/house_backbone.py:epochs=100" in code and "tpp_jax.export_backbone" in code
  assert "drive.mount" in code
  # a TPU is opened by one process: the notebook kernel must not import jax itself
  assert not re.search(r"^\s*(import jax|from jax)", code, re.M)


def test_notebook_mae_command_is_the_readme_one():
  readme = (ROOT / "README.md").read_text()
  lines = [l for l in readme.splitlines()
           if l.startswith("python -m tpp_jax.main") and "mae_visualize_vit_base.pth" in l]
  assert len(lines) == 1, "README 'Real pre-trained checkpoints' has one MAE ViT-B/16 command"
  code = "\n".join(_source(c) for c in _notebook()["cells"] if c["cell_type"] == "code")
  assert "!" + lines[0] + " " in code
  assert "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_base.pth" in code


def test_notebook_batch_sizes_divide_by_8():
  for where, args in _main_commands():
    for a in args:
      m = re.fullmatch(r"--config\.(?:\w+\.)*\w*batch_size=(\d+)", a)
      if m:
        assert int(m.group(1)) % 8 == 0, f"{where}: {a} is not a multiple of 8 TPU cores"


# --------------------------------------------------------------------------------------------- configs


def test_launch_files_name_configs():
  mentioned = {(where.split()[0]) for where, _, _ in _config_mentions()}
  assert NOTEBOOK.name in mentioned
  for script in MINE:
    assert script.name in mentioned, f"{script.name} names no configs/*.py (its default config)"


@pytest.mark.parametrize("where,name,arg", _config_mentions(),
                         ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_config_files_and_presets_exist(where, name, arg):
  assert (CONFIGS / f"{name}.py").is_file(), f"{where}: configs/{name}.py does not exist"
  from tpp_jax.config import split_arg  # exactly how tpp_jax.config.apply_arg splits the ARG
  for token in filter(None, (t.strip() for t in split_arg(arg or ""))):
    assert token in PRESETS or KEY_VALUE_RE.match(token), (
        f"{where}: configs/{name}.py ARG token {token!r} is neither a preset of configs/presets.py "
        f"({sorted(PRESETS)}) nor key=value")


def test_every_main_command_has_a_config_and_workdir():
  cmds = _main_commands()
  assert cmds
  wheres = {w.split()[0] for w, _ in cmds}
  assert {NOTEBOOK.name, "tpu_pod.sh", "slurm.sh"} <= wheres
  for where, args in cmds:
    assert "--config" in args and "--workdir" in args, f"{where}: {args}"
    spec = args[args.index("--config") + 1]
    assert CONFIG_RE.fullmatch(spec) or spec.startswith("$"), f"{where}: --config {spec!r}"


def test_multihost_commands_are_distributed():
  for where, args in _main_commands():
    if where in ("tpu_pod.sh", "slurm.sh"):
      assert "--config.distributed=True" in args, f"{where}: {args}"
  pod, slurm = (LAUNCH / "tpu_pod.sh").read_text(), (LAUNCH / "slurm.sh").read_text()
  assert "gcloud compute tpus tpu-vm ssh" in pod and "--worker=all" in pod
  assert re.search(r"\$\{TPU_NAME:\?", pod) and re.search(r"\$\{ZONE:\?", pod)
  for header in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--time="):
    assert re.search(rf"^#SBATCH {header}", slurm, re.M), header
  assert "srun" in slurm and "XLA_PYTHON_CLIENT_MEM_FRACTION" in slurm


def _load_config_module(name: str):
  spec = importlib.util.spec_from_file_location(f"_launch_test_cfg_{name}", CONFIGS / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)  # the config files put configs/ on sys.path themselves
  return mod


def _literal_commands():
  out = []
  for where, args in _main_commands():
    spec = args[args.index("--config") + 1]
    m = CONFIG_RE.fullmatch(spec)
    if m and "$" not in spec:
      out.append(pytest.param(where, m.group(1), m.group(2), args, id=f"{where}:{spec[:60]}"))
  return out


@pytest.mark.parametrize("where,name,arg,args", _literal_commands())
def test_literal_commands_resolve(where, name, arg, args):
  """get_config(ARG) + the --config.x=V flags + validate(), as main would (no training)."""
  from tpp_jax import config as config_lib
  cfg = _load_config_module(name).get_config(arg)
  overrides = {}
  for a in args:
    m = re.fullmatch(r"--config\.([\w.]+)=(.*)", a)
    if m and not re.search(r"[{$]", m.group(2)):  # skip notebook / shell placeholders
      overrides[m.group(1)] = config_lib.parse_value(m.group(2))
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  # an external checkpoint must not inherit the house backbone's loader settings (experiment.py starts from it)
  init_path = str(cfg.init.path)
  if init_path and "house_vit_ti8_64" not in init_path:
    assert cfg.init.format != "tpp", f"{where}: init.path={init_path} is loaded with init.format='tpp'"
    set_keys = set(overrides) | {t.split("=")[0] for t in (arg or "").split(",") if "=" in t}
    assert "depth" not in cfg.model or "model.depth" in set_keys, (
        f"{where}: model.variant={cfg.model.variant} keeps the house preset's model.depth={cfg.model.depth}")


# --------------------------------------------------------------------------------------------- shell


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  bash = shutil.which("bash")
  assert bash, "bash not found"
  r = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", MINE, ids=lambda p: p.name)
def test_scripts_are_strict(script):
  text = script.read_text()
  assert text.startswith("#!/usr/bin/env bash")
  assert "set -euo pipefail" in text


def test_tpu_pod_usage_and_checks():
  env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
  r = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--help"], capture_output=True, text=True, env=env)
  assert r.returncode == 0 and "TPU_NAME" in r.stdout and "WORKDIR" in r.stdout
  r = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "run"], capture_output=True, text=True, env=env)
  assert r.returncode != 0 and "TPU_NAME" in r.stderr


def _results_dry_run(tmp_path, **env) -> str:
  full_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DRY_RUN": "1", **env}
  r = subprocess.run(["bash", str(LAUNCH / "results.sh"), str(tmp_path / "out")], capture_output=True, text=True,
                     env=full_env, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  return r.stdout


def test_results_lanes_run_every_row_once_on_their_own_cores(tmp_path):
  """launch/results.sh: LANES=2 runs the X-ray rows and the Kvasir rows in two pinned lanes (disjoint cores), each
  lane's own *_lora row (whose baseline the others share) first, then its 5 % label rerun; LANES=1 runs them in one;
  SEEDS="3 5" runs every row with 3 seeds, then again with 5."""
  if not shutil.which("taskset"):
    pytest.skip("taskset (util-linux) is not installed")
  two = _results_dry_run(tmp_path, LANES="2")
  lanes = [chunk.strip().splitlines() for chunk in re.split(r"^lane \d:$", two, flags=re.M)[1:]]
  assert len(lanes) == 2
  lane_of = [[pathlib.Path(re.search(r"--workdir (\S+)", line).group(1)).name for line in lane] for lane in lanes]
  assert lane_of == [["pn_lora", "pn_lora", "pn_frozen", "pn_tpp1000"],
                     ["kv_lora", "kv_lora", "kv_frozen", "kv_tpp1000"]]
  pins = [{re.match(r"taskset -c (\S+) ", line).group(1) for line in lane} for lane in lanes]
  assert all(len(p) == 1 for p in pins) and pins[0] != pins[1], pins
  one = _results_dry_run(tmp_path, LANES="1")
  assert "taskset" not in one and len(one.strip().splitlines()) == 8
  assert all(",seeds=5 " in line for line in one.strip().splitlines())
  passes = _results_dry_run(tmp_path, LANES="1", SEEDS="3 5").strip().splitlines()
  assert [line.count(",seeds=3 ") for line in passes] == ([1] * 4 + [0] * 4) * 2  # per lane: 3 seeds, then 5
  assert [line for line in passes if ",seeds=5 " in line] == one.strip().splitlines()


@pytest.mark.parametrize("data", ["pn", "kv"])
def test_results_rows_share_their_baseline_and_differ_where_the_study_says(tmp_path, data):
  """The *_fractions row resumes the *_lora workdir (only resumable fields differ); the *_frozen and *_tpp1000 rows'
  control arm is the one *_lora runs (pipeline.controls_from accepts it); they differ from it only in the pretext
  head and the TPP length; every labelled arm stops at convergence."""
  from tpp_jax import config as config_lib
  from tpp_jax import pipeline
  from tpp_jax import workdir as workdir_lib

  def config(row: str):
    r = subprocess.run(["bash", str(LAUNCH / "results.sh"), str(tmp_path / "out"), f"{data}_{row}"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                            "DRY_RUN": "1"}, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    args = shlex.split(r.stdout.strip())
    return args[args.index("--workdir") + 1], config_lib.load_config_file(str(ROOT / args[args.index("--config") + 1]))

  wd, lora = config("lora")
  assert (lora.pipeline.budget, lora.pipeline.compute_matched, lora.pipeline.patience) == ("converged", True, 2)
  assert lora.pretext.head == "train" and lora.pipeline.tpp_steps == 200
  pathlib.Path(wd).mkdir(parents=True)
  (pathlib.Path(wd) / "config.json").write_text(config_lib.to_json(lora))
  wd2, fractions = config("fractions")
  # Kvasir: 10 % (5 % of its 280 training images is under one batch of 16)
  assert wd2 == wd and tuple(fractions.pipeline.label_fractions) == ((0.05, 1.0) if data == "pn" else (0.1, 1.0))
  workdir_lib.check_config(fractions, wd)  # resumes *_lora: its TPP arms are reused
  for row, field, value in (("frozen", "head", "frozen"), ("tpp1000", "tpp_steps", 1000)):
    _, shared = config(row)
    assert (shared.pretext if field == "head" else shared.pipeline)[field] == value
    assert shared.pipeline.controls_from == wd
    arms = pipeline.arm_configs(shared, 0, tmp_path / row)
    controls = [a for a, c in arms.items() if pipeline.is_control(c)]
    assert controls == ["baseline"], controls
    pipeline.shared_control_config(arms["baseline"], pathlib.Path(wd), 0, "baseline")  # raises if a field differed
