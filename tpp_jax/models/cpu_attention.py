"""Fused softmax attention for XLA:CPU: a C++ kernel (cpu_attention.cc) called through jax's FFI.

XLA:CPU runs the attention's batched 65 x 64 products at about half the speed of torch.matmul
(benchmarks/attention_products.py). This kernel computes, for each (batch, head), the logits, the softmax and the
output in cache with an AVX2 / FMA register-blocked product, straight from the (B, T, H, D) projections; its
backward recomputes the probabilities from the saved log-sum-exp (as flash attention does).

`build()` compiles the source once per machine with the host's C++ compiler ($CXX, else c++ / g++) and
-march=native into $TPP_KERNEL_CACHE (default ~/.cache/tpp_jax/kernels), keyed by the source, jaxlib's version and
the CPU's flags, and registers the two FFI targets. Where that cannot happen (no compiler, no AVX2, not x86-64,
TPP_CPU_ATTENTION=0) `unavailable()` says why and models/attention.py runs XLA's attention instead.

Under a mesh, `custom_partitioning` runs the kernel on each device's slice of the batch and heads (T and D stay
whole), so the data-parallel engine never gathers the activations.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

SOURCE = Path(__file__).with_name("cpu_attention.cc")
ENV_SWITCH = "TPP_CPU_ATTENTION"  # 0 = never build / use the kernel; 1 (default) = use it where it builds
CACHE_ENV = "TPP_KERNEL_CACHE"
FORWARD_TARGET, BACKWARD_TARGET = "tpp_cpu_attention_forward", "tpp_cpu_attention_backward"
_REGISTERED: list = []  # the loaded library whose handlers XLA runs


def _cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def library_path() -> Path:
  """Where this machine's build of the kernel lives (it need not exist yet)."""
  import jaxlib
  key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
  cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tpp_jax" / "kernels")
  return cache / f"libtpp_cpu_attention-{key}.so"


def _compile(target: Path) -> None:
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    out = Path(tmp) / target.name
    cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
           str(SOURCE), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {(done.stderr.strip().splitlines() or [''])[-1][:300]}")
    os.replace(out, target)  # atomic: processes building at once all end with one whole file


@functools.cache
def build() -> str | None:
  """Compile (once per machine) and register the kernel; None when it is ready, else why it cannot run here."""
  switch = os.environ.get(ENV_SWITCH, "1").strip()
  if switch not in ("0", "1"):
    raise ValueError(f"{ENV_SWITCH}={switch!r}: set it to 0 (XLA's attention on CPU) or 1 (the C++ kernel; default).")
  if switch == "0":
    return f"{ENV_SWITCH}=0"
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return f"the kernel is written for x86-64 AVX2, not {platform.machine()}"
  flags = _cpu_flags().split()
  if "avx2" not in flags or "fma" not in flags:
    return "this CPU has no AVX2 / FMA"
  try:
    path = library_path()
    if not path.exists():
      _compile(path)
    if not _REGISTERED:  # XLA takes one handler per target name and process
      lib = ctypes.cdll.LoadLibrary(str(path))
      jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(lib.TppAttentionForward), platform="cpu")
      jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(lib.TppAttentionBackward), platform="cpu")
      _REGISTERED.append(lib)
  except Exception as e:  # noqa: BLE001 -- any failure to build or load: XLA's attention runs instead
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
  return None


def unavailable(q, k, v) -> str | None:
  """None when the kernel can compute attention(q, k, v) here; else the reason it cannot."""
  if not (q.shape == k.shape == v.shape and q.ndim == 4):
    return f"q, k, v of shapes {q.shape}, {k.shape}, {v.shape} (the kernel does self-attention of (B, T, H, D))"
  if not all(a.dtype == jnp.float32 for a in (q, k, v)):
    return f"dtype {q.dtype} (the kernel computes in float32)"
  if jax.default_backend() != "cpu":
    return f"backend {jax.default_backend()} (the kernel runs on CPU)"
  return build()


# ------------------------------------------------------------------------------------------------------------------
# The FFI calls, partitioned over the batch and heads.
# ------------------------------------------------------------------------------------------------------------------

def _forward_call(q, k, v):
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
  return jax.ffi.ffi_call(FORWARD_TARGET, out_types, vmap_method="broadcast_all")(q, k, v)


def _backward_call(q, k, v, out, lse, d_out):
  out_types = tuple(jax.ShapeDtypeStruct(q.shape, jnp.float32) for _ in range(3))
  return jax.ffi.ffi_call(BACKWARD_TARGET, out_types, vmap_method="broadcast_all")(q, k, v, out, lse, d_out)


def _spec(sharding, rank: int) -> tuple:
  spec = tuple(getattr(sharding, "spec", ())) + (None,) * rank
  return spec[:rank]


def _partitioned(call, n_args: int, lse_args: tuple[int, ...], lse_results: tuple[int, ...], n_results: int):
  """`call` under custom_partitioning: every operand keeps the batch / head sharding of the first (q) and is whole
  along T and D; results come out sharded the same way."""

  def shardings(mesh, arg_shapes):
    b, _, h, _ = _spec(arg_shapes[0].sharding, 4)
    full = NamedSharding(mesh, PartitionSpec(b, None, h, None))
    lse = NamedSharding(mesh, PartitionSpec(b, None, h))
    return full, lse

  def infer(mesh, arg_shapes, result_shape):
    full, lse = shardings(mesh, arg_shapes)
    return tuple(lse if i in lse_results else full for i in range(n_results))

  def partition(mesh, arg_shapes, result_shape):
    full, lse = shardings(mesh, arg_shapes)
    args = tuple(lse if i in lse_args else full for i in range(n_args))
    return mesh, call, infer(mesh, arg_shapes, result_shape), args

  wrapped = custom_partitioning(call)
  operands = ", ".join("b t h" if i in lse_args else "b t h d" for i in range(n_args))
  results = ", ".join("b t h" if i in lse_results else "b t h d" for i in range(n_results))
  wrapped.def_partition(infer_sharding_from_operands=infer, partition=partition,
                        sharding_rule=f"{operands} -> {results}", need_replication_factors=("t", "d"))
  return wrapped


_forward = _partitioned(_forward_call, 3, (), (1,), 2)
_backward = _partitioned(_backward_call, 6, (4,), (), 3)


@jax.custom_vjp
def fused_attention(q, k, v):
  """softmax(q k^T / sqrt(D)) v of float32 (B, T, H, D) q, k, v on the C++ kernel (call build() first)."""
  with jax.named_scope("dot_product_attention"):  # the name profiles group attention by (benchmarks/step_profile.py)
    return _forward(q, k, v)[0]


def _fused_fwd(q, k, v):
  with jax.named_scope("dot_product_attention"):
    out, lse = _forward(q, k, v)
  return out, (q, k, v, out, lse)


def _fused_bwd(residuals, d_out):
  with jax.named_scope("dot_product_attention"):
    return tuple(_backward(*residuals, d_out))


fused_attention.defvjp(_fused_fwd, _fused_bwd)
