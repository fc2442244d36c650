"""The CLI on several devices (XLA's own --xla_force_host_platform_device_count on CPU): it trains data-parallel on
all of them, a batch they cannot split is one error, and a run never imports torch (tensorboardX would)."""
import json

from conftest import SMOKE_CLI, run_cli


def _run(tmp_path, devices, extra=()):
  wd = tmp_path / "run"
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPROFILEIMPORTTIME": "1"}
  return wd, run_cli(SMOKE_CLI + ["--workdir", str(wd), "--config.steps=2", *extra], env=env)


def test_cli_trains_on_every_device_without_importing_torch(tmp_path):
  wd, r = _run(tmp_path, 2)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert json.loads((wd / "summary.json").read_text())["devices"] == 2
  assert "| tensorboardX" in r.stderr and not [line for line in r.stderr.splitlines() if line.endswith("| torch")]


def test_cli_batch_the_devices_cannot_split_is_one_error(tmp_path):
  wd, r = _run(tmp_path, 3, ["--config.batch_size=8"])
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1 and "multiple of the device count (3)" in errors[0], r.stderr[-2000:]
  assert not (wd / "summary.json").exists()
