"""The attention on this CPU, same shapes in both frameworks: its batched matrix products, XLA:CPU (jax.jit) vs
PyTorch (torch.matmul); and the whole attention, forward and forward + backward, tpp_jax's fused C++ kernel
(models/cpu_attention.py) vs XLA's heads-major einsums vs torch's scaled_dot_product_attention.

  python benchmarks/attention_products.py [--batch 64] [--tokens 65] [--heads 3] [--head-dim 64] [--threads 2]

The products of softmax attention over (batch x heads) independent matrices, as the demo-size ViT's step runs them:
QK^T (T x D . D x T) and PV (T x T . T x D), timed in turn (jax, torch, jax, ...) so that both see the same machine
state; prints ms and GFLOP/s per row (medians of --repeats timings of --steps calls) and the largest difference of
the two frameworks' results. README "Performance" uses it to show where XLA:CPU loses the attention to PyTorch
and what the kernel changes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tpp_jax.models import cpu_attention
from tpp_jax.models.attention import heads_major_attention


def timed(fn, steps: int) -> float:
  """ms per call of fn() over `steps` calls, after one untimed call (fn waits for its result)."""
  fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--tokens", type=int, default=65, help="T (65: 64 px images, patch 8, plus the class token)")
  ap.add_argument("--heads", type=int, default=3)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (XLA:CPU uses every core)")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args(argv)
  try:
    import torch
  except ImportError:
    raise SystemExit("error: attention_products.py times PyTorch beside XLA: pip install torch "
                     "(or this project's [test] extra).") from None
  torch.set_num_threads(a.threads)
  n, t, d = a.batch * a.heads, a.tokens, a.head_dim
  rng = np.random.default_rng(0)
  q, k = (rng.standard_normal((n, t, d)).astype(np.float32) for _ in range(2))
  p = rng.standard_normal((n, t, t)).astype(np.float32)
  jq, jk, jp = map(jnp.asarray, (q, k, p))
  tq, tk, tp = map(torch.from_numpy, (q, k, p))
  qk = jax.jit(lambda q, k: jnp.einsum("ntd,nsd->nts", q, k))
  pv = jax.jit(lambda p, v: jnp.einsum("nts,nsd->ntd", p, v))
  rows = {  # name: (FLOPs, jax call, torch call)
      f"QK^T ({n} x {t}x{d} . {d}x{t})": (2 * n * t * t * d, lambda: qk(jq, jk).block_until_ready(),
                                          lambda: torch.matmul(tq, tk.transpose(-1, -2))),
      f"PV   ({n} x {t}x{t} . {t}x{d})": (2 * n * t * t * d, lambda: pv(jp, jk).block_until_ready(),
                                          lambda: torch.matmul(tp, tk)),
  }
  diff = max(float(np.abs(np.asarray(qk(jq, jk)) - torch.matmul(tq, tk.transpose(-1, -2)).numpy()).max()),
             float(np.abs(np.asarray(pv(jp, jk)) - torch.matmul(tp, tk).numpy()).max()))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} | torch {torch.__version__}, {a.threads} threads | "
        f"medians of {a.repeats} x {a.steps} calls, timed in turn")
  print("| product | XLA ms | torch ms | XLA GFLOP/s | torch GFLOP/s | XLA / torch time |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, (flops, run_jax, run_torch) in rows.items():
    times = {"jax": [], "torch": []}
    for _ in range(a.repeats):
      times["jax"].append(timed(run_jax, a.steps))
      times["torch"].append(timed(run_torch, a.steps))
    tj, tt = statistics.median(times["jax"]), statistics.median(times["torch"])
    print(f"| {name} | {tj:.2f} | {tt:.2f} | {flops / tj / 1e6:.3g} | {flops / tt / 1e6:.3g} | {tj / tt:.2f}x |")
  print(f"max |jax - torch| over both products: {diff:.2e}")
  whole_attention(a, torch, rng)


def whole_attention(a, torch, rng):
  """Forward and forward + backward (gradients of sum(out * w) for q, k, v) of softmax attention on (B, T, H, D)."""
  shape = (a.batch, a.tokens, a.heads, a.head_dim)
  q, k, v, w = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
  reason = cpu_attention.build()
  impls = {"XLA": heads_major_attention} if reason else {"kernel": cpu_attention.fused_attention,
                                                         "XLA": heads_major_attention}
  jax_calls, results = {}, {}
  for name, fn in impls.items():
    fwd = jax.jit(fn)
    grads = jax.jit(jax.grad(lambda q, k, v, fn=fn: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2)))
    jax_calls[name] = (lambda fwd=fwd: fwd(q, k, v).block_until_ready(),
                       lambda grads=grads: jax.block_until_ready(grads(q, k, v)))
    results[name] = [np.asarray(fwd(q, k, v))] + [np.asarray(g) for g in grads(q, k, v)]
  heads_first = lambda x, grad=False: torch.from_numpy(x).transpose(1, 2).requires_grad_(grad)  # (B, H, T, D) views
  tq, tk, tv = (heads_first(x, True) for x in (q, k, v))
  tw = heads_first(w)
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def torch_forward():
    with torch.no_grad():
      return sdpa(tq, tk, tv)

  def torch_backward():
    for x in (tq, tk, tv):
      x.grad = None
    (sdpa(tq, tk, tv) * tw).sum().backward()

  torch_backward()
  reference = [torch_forward().transpose(1, 2).numpy()] + [x.grad.transpose(1, 2).numpy() for x in (tq, tk, tv)]
  print(f"\nsoftmax attention of (B, T, H, D) = {shape}, float32: tpp_jax's C++ kernel, XLA's heads-major einsums, "
        f"torch SDPA" + (f" (kernel: n/a, {reason})" if reason else ""))
  print("| pass | kernel ms | XLA ms | torch ms | kernel / torch time | XLA / torch time |")
  print("|---|---:|---:|---:|---:|---:|")
  for i, label in enumerate(("forward", "forward + backward")):
    times = {name: [] for name in (*jax_calls, "torch")}
    for _ in range(a.repeats):
      for name, calls in jax_calls.items():
        times[name].append(timed(calls[i], a.steps))
      times["torch"].append(timed(torch_forward if i == 0 else torch_backward, a.steps))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    kernel = f"{med['kernel']:.2f}" if "kernel" in med else "n/a"
    ratio = f"{med['kernel'] / med['torch']:.2f}x" if "kernel" in med else "n/a"
    xla_ratio = med["XLA"] / med["torch"]
    print(f"| {label} | {kernel} | {med['XLA']:.2f} | {med['torch']:.2f} | {ratio} | {xla_ratio:.2f}x |")
  for name, got in results.items():
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, reference))
    print(f"max |{name} - torch| over the output and the three gradients: {diff:.2e}")


if __name__ == "__main__":
  main()
