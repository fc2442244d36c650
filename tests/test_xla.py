"""tpp_jax/xla.py: the CPU device count TPP_CPU_DEVICES asks for, and that the CLI trains on that many devices."""
import json

import pytest

from tpp_jax import main, xla

from conftest import SMOKE_CLI, load_config, run_cli


def test_cpu_device_count_rules():
  assert xla.cpu_device_count("3", cores=2) == 3  # an explicit count is taken as given
  assert xla.cpu_device_count("auto", cores=2, batch_sizes=(32, 128, 64)) == 2
  assert xla.cpu_device_count(" AUTO ", cores=8, batch_sizes=(12, 128)) == 4  # the largest that divides them all
  assert xla.cpu_device_count("auto", cores=4, batch_sizes=(3, 128)) == 1
  assert xla.cpu_device_count("auto", cores=6, batch_sizes=()) == 6
  for bad in ("0", "-2", "two", "1.5"):
    with pytest.raises(ValueError, match="TPP_CPU_DEVICES"):
      xla.cpu_device_count(bad, cores=2)


def test_use_cpu_devices_leaves_an_explicit_xla_flag_and_an_unset_variable_alone():
  assert xla.use_cpu_devices((8,), environ={}) is None
  assert xla.use_cpu_devices((8,), environ={"TPP_CPU_DEVICES": "2",
                                            "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) is None


def test_batch_sizes_of_a_pipeline_include_its_tpp_batch():
  c = load_config("experiment", "pneumonia,smoke,px32,stage=pipeline,pipeline.tpp_batch_size=6")
  assert main.batch_sizes(c) == (int(c.batch_size), int(c.eval_batch_size), 6)
  assert 6 not in main.batch_sizes(load_config("experiment", "pneumonia,smoke,px32,pipeline.tpp_batch_size=6"))


def _summary_devices(tmp_path, env, extra=(), stderr=None):
  """The device count in the summary of a 2-step CLI run (its stderr appended to the list `stderr`, if given)."""
  wd = tmp_path / "run"
  r = run_cli(SMOKE_CLI + ["--workdir", str(wd), "--config.steps=2", *extra], env={"XLA_FLAGS": "", **env})
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  if stderr is not None:
    stderr.append(r.stderr)
  return json.loads((wd / "summary.json").read_text())["devices"]


def test_cli_trains_on_the_cpu_devices_asked_for(tmp_path):
  # with Python's import log on: a CLI run never imports torch (tensorboardX would: logging_utils.summary_writer_class)
  err = []
  assert _summary_devices(tmp_path / "a", {"TPP_CPU_DEVICES": "2", "PYTHONPROFILEIMPORTTIME": "1"}, stderr=err) == 2
  assert "| tensorboardX" in err[0] and not [line for line in err[0].splitlines() if line.endswith("| torch")]
  assert _summary_devices(tmp_path / "b", {}) == 1  # unset: XLA's one CPU device


def test_cli_cpu_devices_that_do_not_divide_the_batch_is_one_error(tmp_path):
  cases = (("3", "multiple of the device count (3) (on CPU, TPP_CPU_DEVICES"), ("two", "TPP_CPU_DEVICES='two'"))
  for value, words in cases:
    r = run_cli(SMOKE_CLI + ["--workdir", str(tmp_path / value), "--config.batch_size=8", "--config.steps=2"],
                env={"XLA_FLAGS": "", "TPP_CPU_DEVICES": value})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and words in errors[0], r.stderr[-2000:]
    assert not (tmp_path / value / "summary.json").exists()
