"""XLA compile options: the one place that tunes how steps compile, and the jit every module uses.

XLA:CPU (jax 0.10) outlines ViT steps into large YNNPACK fusions that run the backward pass at about half the
speed of plain XLA dots + loop fusions: the demo-size LoRA fine-tune step (2-core CPU) took 488 ms with them and
435 ms without. `compiler_options()` turns them off on CPU, where the running
XLA knows the option; elsewhere (GPU / TPU, or an XLA without it) it is None and nothing changes.
Set TPP_XLA_DEFAULTS=0 to compile with XLA's own defaults.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # "" = no YNNPACK fusions


@functools.cache
def compiler_options() -> dict | None:
  """The options for this process's backend, or None (non-CPU, opted out, or an XLA that rejects them)."""
  if os.environ.get("TPP_XLA_DEFAULTS", "1") == "0" or jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(jnp.zeros(())).compile()
  except Exception:  # noqa: BLE001 -- an older / newer XLA without this option: keep its defaults
    return None
  return dict(CPU_OPTIONS)


def jit(fn, **kwargs):
  """jax.jit with this backend's compiler_options()."""
  options = compiler_options()
  if options:
    kwargs.setdefault("compiler_options", options)
  return jax.jit(fn, **kwargs)
