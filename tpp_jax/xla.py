"""XLA compile options: the one place that tunes how steps compile, and the jit every module uses.

XLA:CPU (jax 0.10) outlines ViT steps into large YNNPACK fusions that run the backward pass at about half the
speed of plain XLA dots + loop fusions: the demo-size LoRA fine-tune step (2-core CPU) took 488 ms with them and
435 ms without. `compiler_options()` turns them off on CPU, where the running
XLA knows the option; elsewhere (GPU / TPU, or an XLA without it) it is None and nothing changes.
With several CPU devices (TPP_CPU_DEVICES, below) it also runs each device's ops on one thread.
Set TPP_XLA_DEFAULTS=0 to compile with XLA's own defaults.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # "" = no YNNPACK fusions
# With several CPU devices each runs its own ops on its own thread; Eigen's intra-op pool on top of that only makes
# them contend (demo LoRA fine-tune step, 2 devices on 2 cores, `step_speed.py --small`: 345-355 ms with it,
# 318-329 ms without)
CPU_MULTI_DEVICE_OPTIONS = {"xla_cpu_multi_thread_eigen": False}


@functools.cache
def compiler_options() -> dict | None:
  """The options for this process's backend, or None (non-CPU, opted out, or an XLA that rejects them)."""
  if os.environ.get("TPP_XLA_DEFAULTS", "1") == "0" or jax.default_backend() != "cpu":
    return None
  options = dict(CPU_OPTIONS)
  if jax.local_device_count() > 1:  # one thread per device: the devices already take the cores (TPP_CPU_DEVICES)
    options.update(CPU_MULTI_DEVICE_OPTIONS)
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
  except Exception:  # noqa: BLE001 -- an older / newer XLA without these options: keep its defaults
    return None
  return options


def cache_across_processes() -> None:
  """Let JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, when set) find this process's programs again
  from another process. A program with the fused CPU attention kernel (tpp_jax/models/cpu_attention.py) holds a
  pointer to the kernel's Python partitioning callbacks, and JAX hashes that pointer into the cache key unless told
  not to: every new process then compiled those steps again. For the CLI's own process only, which runs tpp_jax's
  programs alone: there the callbacks are fixed functions of the program's shapes and shardings, so a program with
  the same HLO partitions the same way (JAX keeps the pointer in the key for processes that may hold other
  callbacks)."""
  jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)


def jit(fn, **kwargs):
  """jax.jit with this backend's compiler_options()."""
  options = compiler_options()
  if options:
    kwargs.setdefault("compiler_options", options)
  return jax.jit(fn, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# CPU devices: TPP_CPU_DEVICES=N|auto
# ------------------------------------------------------------------------------------------------------------------
# XLA:CPU runs a step's element-wise fusions (GELU, LayerNorm, softmax, the optimizer update) on one thread; only the
# large dots use the other cores. With the cores exposed as N CPU devices, the engine's data-parallel mesh splits
# each batch over them and every op of the step runs N-wide (the same program: the loss is the global batch's
# mean). On a 2-core CPU the demo's LoRA fine-tune through the CLI trains 1.15x the images/s (README "Performance").

CPU_DEVICES_ENV = "TPP_CPU_DEVICES"
_COUNT_FLAG = "xla_force_host_platform_device_count"


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask, e.g. under taskset), else os.cpu_count()."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS / Windows
    return os.cpu_count() or 1


def cpu_device_count(setting: str, cores: int, batch_sizes=()) -> int:
  """The count TPP_CPU_DEVICES=`setting` asks for: N (a positive integer), or for 'auto' the largest count <= cores
  that divides every batch size (so 'auto' never makes a batch indivisible)."""
  setting = setting.strip().lower()
  if setting == "auto":
    sizes = [int(b) for b in batch_sizes if int(b) > 0]
    return max(n for n in range(1, max(cores, 1) + 1) if all(b % n == 0 for b in sizes))
  try:
    n = int(setting)
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f"{CPU_DEVICES_ENV}={setting!r}: use a positive integer (the CPU device count) or 'auto' (one "
                     "device per usable core that divides the batch sizes); unset it for one CPU device.")
  return n


def use_cpu_devices(batch_sizes=(), environ=None) -> int | None:
  """Apply TPP_CPU_DEVICES before JAX starts its backends; returns the count set, or None where nothing is set
  (the variable unset / empty, or XLA_FLAGS already fixing --xla_force_host_platform_device_count). The count
  concerns the CPU platform only: on a GPU / TPU host JAX's default devices are the accelerators, unchanged."""
  environ = os.environ if environ is None else environ
  setting = environ.get(CPU_DEVICES_ENV, "").strip()
  if not setting or _COUNT_FLAG in environ.get("XLA_FLAGS", ""):
    return None
  n = cpu_device_count(setting, usable_cores(), batch_sizes)
  jax.config.update("jax_num_cpu_devices", n)
  return n
