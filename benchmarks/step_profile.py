"""Where a tpp_jax training step spends its time on this backend: XLA ops grouped by what they compute.

  python benchmarks/step_profile.py [--row finetune|tpp] [--steps 5] [--full]

Builds the same jitted step as `benchmarks/step_speed.py` (LoRA fine-tune, or the TPP MAE+LoRA step), runs
--steps of it under jax.profiler with XLA:CPU's per-op trace events on, maps every traced XLA op (fusion) to the
JAX operation it came from (its op_name metadata) and prints ms per step per group: matmuls of the projections /
MLP / LoRA / head, attention (scores, softmax, weighted values), layout copies (transposes XLA inserts around the
batched attention matmuls), GELU, LayerNorm, the optimizer, the rest. Ops on XLA's worker threads overlap, so the
groups can add up to more than the wall time per step (printed too). On GPU the same groups are read off the kernels
on the GPU's streams (each kernel's XLA op from the trace, cuBLAS / Triton GEMMs as matmuls, cuDNN's fused attention
as attention), followed by the --top kernels; on TPU use XProf / TensorBoard's profile plugin.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# XLA:CPU emits per-op trace events only with this flag (before jax starts its backend)
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

import jax
import step_speed

GROUPS = ("matmul: q/k/v/o, MLP, LoRA, head", "attention: QK^T, softmax, AV", "layout copies / transposes", "GELU",
          "LayerNorm", "optimizer (AdamW)", "other")


def group_of(instr: str, op_name: str, gpu: bool = False) -> str:
  """The group of one traced XLA op, from its instruction name and its JAX op_name (gpu: also cuBLAS / Triton GEMM
  kernels and cuDNN's fused attention, which XLA:GPU emits as custom calls and gemm fusions)."""
  if "adam" in op_name or "optax" in op_name or "apply_updates" in op_name:
    return GROUPS[5]
  last = op_name.split(";")[0].rsplit("/", 1)[-1]
  if gpu and ("dot_product_attention" in op_name or "attn/vmap" in op_name or "fmha" in instr):
    return GROUPS[1]
  if gpu and ("gemm" in instr or "cublas" in instr or "triton" in instr or last == "dot_general"):
    return GROUPS[0]
  if instr.startswith(("transpose", "copy")) or last in ("transpose", "reshape") and not instr.startswith("dot"):
    return GROUPS[2]
  if "attn/vmap" in op_name or "dot_product_attention" in op_name or "softmax" in op_name:
    return GROUPS[1]
  if instr.startswith("dot") or "ynn_fusion" in instr:
    return GROUPS[0]
  if "mlp/erf" in op_name or "gelu" in op_name or "mlp/mul" in op_name:
    return GROUPS[3]
  if re.search(r"norm\d?/", op_name):
    return GROUPS[4]
  return GROUPS[6]


def op_names(hlo_text: str) -> dict[str, str]:
  return {m.group(1): m.group(2) for m in
          re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"", hlo_text)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--row", choices=("finetune", "tpp"), default="finetune")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--full", action="store_true",
                  help="ViT-B/16 at 224 px, batch 256, bf16 (default on CPU: the demo size)")
  ap.add_argument("--top", type=int, default=25, help="GPU: list the N kernels that take the most time")
  ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
  a = ap.parse_args(argv)
  s = step_speed.make_setup("full" if a.full else "tiny" if a.tiny else "small", None, None)
  js = step_speed.jax_finetune(s) if a.row == "finetune" else step_speed.jax_tpp(s)
  hlo = js.compiled.as_text()
  names = op_names(hlo)
  calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
  print(f"custom calls in the compiled step: {dict(calls.most_common(8)) or 'none'}")
  step = js.start([0.0])
  for _ in range(2):
    step.run()
  step.sync()
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(a.steps):
        step.run()
      step.sync()
    wall = (time.perf_counter() - t0) / a.steps
    trace = next(pathlib.Path(tmp).rglob("*.trace.json.gz"))
    events = json.load(gzip.open(trace))["traceEvents"]
  gpu = jax.default_backend() == "gpu"
  total, kernels = collections.Counter(), collections.Counter()
  if gpu:  # kernels on the GPU's streams: the device's processes in the trace, named /device:GPU:*
    procs = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    lines = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in procs}
    streams = {k for k, v in lines.items() if v.lower().startswith("stream")}  # not the derived 'XLA Ops' lines
    print(f"GPU trace lines: {sorted(set(lines.values()))[:12]}")
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X":
      continue
    if gpu:
      if e.get("pid") not in procs or (streams and (e.get("pid"), e.get("tid")) not in streams):
        continue
      instr = str(e.get("args", {}).get("hlo_op", name))
      ms = e.get("dur", 0) / 1e3 / a.steps
      g = group_of(instr + " " + name, names.get(instr, ""), gpu=True)
      total[g] += ms
      kernels[(g, name[:60], instr, names.get(instr, "")[-70:])] += ms
    elif name in names:
      total[group_of(name, names[name])] += e.get("dur", 0) / 1e3 / a.steps
  busy = sum(total.values())
  print(f"{a.row} step, {s.vit.image_size} px, batch {s.batch}, jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"wall {wall * 1e3:.1f} ms/step under the profiler; traced ops {busy:.1f} ms/step"
        + ("" if gpu else f" summed over XLA's threads ({busy / (wall * 1e3):.2f} cores busy on average)"))
  print("| group | ms/step | share |\n|---|---:|---:|")
  for g in GROUPS:
    print(f"| {g} | {total[g]:.1f} | {100 * total[g] / max(busy, 1e-9):.0f} % |")
  if kernels:  # GPU: the kernels that take the time, with the XLA op and the JAX op it came from
    print(f"\ntop {a.top} GPU kernels, ms/step:\n| ms | group | kernel | XLA op | JAX op (end) |")
    print("|---:|---|---|---|---|")
    for (g, kname, instr, op), ms in kernels.most_common(a.top):
      print(f"| {ms:.2f} | {g.split(':')[0]} | {kname} | {instr} | {op} |")


if __name__ == "__main__":
  main()
