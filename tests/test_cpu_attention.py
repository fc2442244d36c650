"""tpp_jax/models/cpu_attention.py: the fused C++ CPU attention against torch's SDPA (values and gradients), under a
mesh of 8 CPU devices, under vmap, its build cache and its fallbacks; and through the CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpp_jax.models import attention as attention_lib
from tpp_jax.models import cpu_attention

from conftest import SMOKE_CLI, check_attention_against_torch, run_cli, torch_sdpa

pytestmark = pytest.mark.skipif(cpu_attention.build() is not None,
                                reason=f"the kernel cannot be built here: {cpu_attention.build()}")


def inputs(shape, seed):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("shape", [(2, 1, 1, 8), (3, 5, 2, 12), (2, 17, 3, 64), (3, 65, 3, 64), (1, 50, 4, 33)])
def test_values_and_gradients_match_torch_sdpa(shape):
  """Token counts below, at and above the 6-row / 8-column blocks, a head width that is no multiple of 8."""
  check_attention_against_torch(lambda q, k, v: attention_lib.attention(q, k, v, "cpu_kernel"), shape, shape[1])


def test_large_logits_stay_finite_and_match():
  """Logits of several hundred: the softmax subtracts each row's max, as torch does."""
  q, k, v, w = inputs((2, 9, 2, 16), seed=1)
  q, k = q * 12, k * 12
  out = jax.jit(cpu_attention.fused_attention)(q, k, v)
  ref, _ = torch_sdpa(q, k, v, w)
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_a_nan_in_the_inputs_comes_out_as_nan_as_in_torch():
  """A diverging run must not be hidden: the engine's NaN check reads the loss downstream of the attention."""
  q, k, v, w = inputs((2, 9, 2, 16), seed=2)
  q[0, 3, 1, 5] = np.nan
  out = np.asarray(jax.jit(cpu_attention.fused_attention)(q, k, v))
  ref, _ = torch_sdpa(q, k, v, w)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
  assert np.isnan(out[0, 3, 1]).all() and not np.isnan(out[1]).any()


def test_auto_runs_the_kernel_for_float32_on_cpu_and_xla_for_bfloat16():
  q = jnp.zeros((2, 9, 2, 16), jnp.float32)
  hlo = lambda x: jax.jit(lambda x: attention_lib.attention(x, x, x, "auto")).lower(x).as_text()
  assert cpu_attention.FORWARD_TARGET in hlo(q)
  assert cpu_attention.FORWARD_TARGET not in hlo(q.astype(jnp.bfloat16))
  assert cpu_attention.FORWARD_TARGET not in jax.jit(
      lambda x: attention_lib.attention(x, x, x, "xla")).lower(q).as_text()


@pytest.mark.parametrize("spec", [PartitionSpec("data"), PartitionSpec(None, None, "data")])
def test_sharded_over_8_devices_equals_one_device_without_gathering(spec):
  """Batch (or head) sharded over the 8 CPU devices: each device runs the kernel on its slice, no all-gather, and
  values and gradients equal the one-device call."""
  assert jax.device_count() == 8
  q, k, v, w = inputs((8, 17, 8, 16), seed=3)
  loss = lambda q, k, v: (cpu_attention.fused_attention(q, k, v) * w).sum()
  step = lambda q, k, v: (cpu_attention.fused_attention(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, spec)
  sharded = jax.jit(step, in_shardings=(sharding,) * 3, out_shardings=(sharding, (sharding,) * 3))
  compiled = sharded.lower(q, k, v).compile().as_text()
  assert "all-gather" not in compiled and "all-to-all" not in compiled
  got_out, got_grads = sharded(q, k, v)
  ref_out, ref_grads = jax.jit(step)(q, k, v)
  np.testing.assert_array_equal(got_out, ref_out)
  for g, r in zip(got_grads, ref_grads):
    np.testing.assert_array_equal(g, r)


def test_auto_under_vmap_falls_back_to_xla_with_a_warning(monkeypatch, caplog):
  """jax.vmap of a model: custom_partitioning has no batching rule, so 'auto' runs XLA's attention there."""
  monkeypatch.setattr(attention_lib, "_WARNED", set())
  q, k, v, _ = inputs((3, 2, 9, 2, 16), seed=4)
  with caplog.at_level("WARNING"):
    got = jax.jit(jax.vmap(lambda q, k, v: attention_lib.attention(q, k, v, "auto")))(q, k, v)
  assert any("Batching rule for 'custom_partitioning'" in r.getMessage() for r in caplog.records)
  for i in range(3):
    np.testing.assert_allclose(got[i], jax.jit(cpu_attention.fused_attention)(q[i], k[i], v[i]), rtol=1e-5, atol=1e-6)


def test_build_compiles_once_into_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(cpu_attention.CACHE_ENV, str(tmp_path))
  assert cpu_attention.build.__wrapped__() is None
  built = list(tmp_path.iterdir())
  assert [p.name for p in built] == [cpu_attention.library_path().name]
  stamp = built[0].stat().st_mtime_ns
  assert cpu_attention.build.__wrapped__() is None  # loads the cached file; registering again is harmless
  assert built[0].stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1


def test_a_failing_compiler_is_a_reason_and_auto_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv(cpu_attention.CACHE_ENV, str(tmp_path))
  monkeypatch.setattr(cpu_attention, "_compiler", lambda: "/bin/false")
  reason = cpu_attention.build.__wrapped__()
  assert reason is not None and "failed" in reason and not list(tmp_path.iterdir())
  monkeypatch.setenv(cpu_attention.ENV_SWITCH, "0")
  assert cpu_attention.build.__wrapped__() == "TPP_CPU_ATTENTION=0"
  monkeypatch.setenv(cpu_attention.ENV_SWITCH, "off")
  with pytest.raises(ValueError, match="TPP_CPU_ATTENTION='off': set it to 0"):
    cpu_attention.build.__wrapped__()

  monkeypatch.setattr(cpu_attention, "build", lambda: "RuntimeError: c++ failed")
  monkeypatch.setattr(attention_lib, "_WARNED", set())
  q = jnp.ones((2, 9, 2, 16), jnp.float32)
  with caplog.at_level("WARNING"):
    for _ in range(2):
      hlo = jax.jit(lambda x: attention_lib.attention(x, x, x, "auto")).lower(q).as_text()
  assert cpu_attention.FORWARD_TARGET not in hlo
  assert [r.getMessage() for r in caplog.records if "kernel" in r.getMessage()] == [
      "model.attention=auto: the fused CPU attention kernel cannot run (RuntimeError: c++ failed); using XLA's."]
  with pytest.raises(ValueError, match="model.attention='cpu_kernel' cannot run here: RuntimeError: c"):
    attention_lib.attention(q, q, q, "cpu_kernel")


def test_cli_finetune_with_the_kernel_equals_xla_attention(tmp_path):
  """Through `python -m tpp_jax.main`: the same fine-tune with model.attention=cpu_kernel and =xla ends with the
  same validation and test metrics (the kernel's rounding differs from XLA's only in the last bits)."""
  finals = {}
  for impl in ("cpu_kernel", "xla"):
    workdir = tmp_path / impl
    r = run_cli(SMOKE_CLI + ["--workdir", str(workdir), "--config.stage=finetune", "--config.steps=4",
                             f"--config.model.attention={impl}"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    finals[impl] = json.loads((workdir / "summary.json").read_text())["final"]
  for split, metrics in finals["xla"].items():
    for name, value in metrics.items():
      if isinstance(value, float):
        assert finals["cpu_kernel"][split][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (split, name)


def test_cli_kernel_steps_are_found_in_the_persistent_cache_by_the_next_process(tmp_path):
  """The kernel's steps carry a pointer to its partitioning callbacks, which JAX hashes into the persistent cache's
  key unless told not to (tpp_jax/xla.py cache_across_processes): a second CLI process with the same cache dir
  compiles nothing new. (JAX's own default, set here, is to hash it: then the second run wrote 2 new entries.)"""
  env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY": "false"}
  entries, finals = [], []
  for run in ("first", "second"):
    r = run_cli(SMOKE_CLI + ["--workdir", str(tmp_path / run), "--config.stage=finetune", "--config.steps=2"], env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    entries.append(sorted(p.name for p in (tmp_path / "xla_cache").iterdir()))
    finals.append(json.loads((tmp_path / run / "summary.json").read_text())["final"])
  assert entries[0] and entries[1] == entries[0]
  assert finals[1] == finals[0]


def test_cli_cpu_kernel_where_it_cannot_run_is_one_error_naming_why(tmp_path):
  r = run_cli(SMOKE_CLI + ["--workdir", str(tmp_path / "run"), "--config.stage=finetune", "--config.steps=2",
                           "--config.model.attention=cpu_kernel"], env={"TPP_CPU_ATTENTION": "0"})
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
  assert "model.attention='cpu_kernel' cannot run here: TPP_CPU_ATTENTION=0. Use model.attention='auto'." in errors[0]
