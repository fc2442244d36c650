"""The attention's batched matrix products on this CPU: XLA:CPU (jax.jit) vs PyTorch (torch.matmul), same shapes.

  python benchmarks/attention_products.py [--batch 64] [--tokens 65] [--heads 3] [--head-dim 64] [--threads 2]

The products of softmax attention over (batch x heads) independent matrices, as the demo-size ViT's step runs them:
QK^T (T x D . D x T) and PV (T x T . T x D), timed in turn (jax, torch, jax, ...) so that both see the same machine
state; prints ms and GFLOP/s per row (medians of --repeats timings of --steps calls) and the largest difference of
the two frameworks' results. README "Performance" uses it to show where XLA:CPU loses the attention to PyTorch.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


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
    print(f"| {name} | {tj:.2f} | {tt:.2f} | {flops / tj / 1e6:.1f} | {flops / tt / 1e6:.1f} | {tj / tt:.2f}x |")
  print(f"max |jax - torch| over both products: {diff:.2e}")


if __name__ == "__main__":
  main()
