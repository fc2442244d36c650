"""Softmax attention for the ViT and the MAE decoder: which implementation runs where.

`attention(q, k, v, implementation)` takes (B, T, H, D) q, k, v. 'auto' (model.attention's default):
  GPU   cuDNN's fused (flash) attention for bf16 / fp16 inputs. cuDNN's training kernels refuse an odd token count
        (ViT-B/16 at 224 px has 197 tokens), so an odd T is padded by one token that a key/value length mask hides
        (`padded_attention`). That padded call is checked once per shape and process against XLA's attention on
        random inputs, values and gradients (`padded_check`): where it fails or differs, XLA's attention runs, with
        one warning;
  else  jax.nn.dot_product_attention(implementation='xla') (CPU, TPU, fp32 on GPU).
'xla' / 'cudnn' insist on jax's implementation of that name ('cudnn' pads an odd T as above, unchecked).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _WARNED:  # once per reason: a slower path should not go unnoticed, nor flood the log
    _WARNED.add(message)
    logging.warning(message)


def padded_attention(q, k, v, implementation: str):
  """jax.nn.dot_product_attention of (B, T, H, D) inputs with T padded to even: one zero token appended to q, k and
  v, hidden from every query by key_value_seq_lengths = T, and its output row dropped. Same values and gradients as
  the unpadded call (tests/models/test_attention.py, through implementation='xla')."""
  b, t = q.shape[:2]
  if t % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  pad = ((0, 0), (0, 1), (0, 0), (0, 0))
  lengths = jnp.full((b,), t, jnp.int32)
  with jax.named_scope("dot_product_attention"):
    out = jax.nn.dot_product_attention(*(jnp.pad(a, pad) for a in (q, k, v)), query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :t]


@functools.lru_cache(maxsize=None)
def padded_check(implementation: str, t: int, heads: int, head_dim: int, dtype: str) -> str | None:
  """None when padded_attention(implementation=...) compiles, runs and matches XLA's unpadded attention (values and
  the gradients of q, k, v, within bf16 / fp16 rounding) on random (2, t, heads, head_dim) inputs; else the reason.

  Runs eagerly even when called while a step is being traced (jax.ensure_compile_time_eval), so it adds nothing to
  the step's graph; a few seconds once per shape and process."""
  try:
    with jax.ensure_compile_time_eval():
      rng = np.random.default_rng(0)
      q, k, v, w = (jnp.asarray(rng.standard_normal((2, t, heads, head_dim)), dtype) for _ in range(4))

      def value_and_grads(fn):
        loss = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w.astype(jnp.float32)).sum()
        out, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

      got = value_and_grads(lambda q, k, v: padded_attention(q, k, v, implementation))
      ref = value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
      for name, got, ref in zip(("value", "dq", "dk", "dv"), got, ref):
        err, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max()) + 1e-6
        if not err <= 0.02 * scale + 1e-2:
          return f"{name} differs from XLA's by {err:.3g} (max |XLA| {scale:.3g})"
  except Exception as e:  # noqa: BLE001 -- any failure to build or run it means: use XLA's
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
  return None


def attention(q, k, v, implementation: str = "auto"):
  """Softmax attention of (B, T, H, D) q, k, v -> (B, T, H, D); the module docstring says which one runs where."""
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  if implementation == "cudnn":
    return padded_attention(q, k, v, "cudnn")
  backend = jax.default_backend()
  if backend != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 8:
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  t, heads, head_dim = q.shape[1:]
  if t % 2:
    reason = padded_check("cudnn", t, heads, head_dim, jnp.dtype(q.dtype).name)
    if reason is not None:
      _warn_once(f"model.attention=auto: cuDNN fused attention with {t} tokens (padded to {t + 1}) failed its check "
                 f"({reason}); using XLA's attention.")
      return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  try:
    return padded_attention(q, k, v, "cudnn")
  except (ValueError, NotImplementedError, RuntimeError) as e:  # cuDNN too old / shape unsupported: XLA's
    _warn_once(f"model.attention=auto: cuDNN fused attention refused q {q.shape} {q.dtype} "
               f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); using XLA's attention.")
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
