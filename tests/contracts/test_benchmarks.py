"""benchmarks/: the side-by-side step table runs end to end, its analytic FLOP counts are right, and the other
benchmarks (step profile, checkpoint saves) run through their CLIs."""
import importlib.util
import os
import re
import subprocess
import sys

import jax

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "step_speed.py"
RATIO_RE = r"ratio tpp_jax/pytorch: finetune (\d+\.\d\d)x, mae (\d+\.\d\d)x"


def load_step_speed():
  spec = importlib.util.spec_from_file_location("step_speed", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["step_speed"] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


def torch_peers() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def test_step_speed_table_and_flops():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a plain run
  r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--repeats", "1", "--warmup", "1",
                      "--no-compile", "--pairs", "3"], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
                     capture_output=True, text=True, timeout=300)
  out = r.stdout
  assert r.returncode == 0, (out + r.stderr)[-3000:]
  rows = {l.split("|")[1].strip(): l for l in out.splitlines() if l.startswith("| ")}
  assert " x cpu (cpu; timed on one) | " in out.splitlines()[0], out[:500]
  for name in ("LoRA fine-tune, tpp_jax", "TPP MAE+LoRA, tpp_jax"):
    assert name in rows, out
    ms = rows[name].split("|")[2].strip()
    assert float(ms) > 0, rows[name]
    assert rows[name].rstrip(" |").endswith("2.00"), rows[name]  # AdamW: m + v in fp32 per trainable param
  if torch_peers():
    assert "LoRA fine-tune, transformers+peft (eager)" in rows and "TPP MAE+LoRA, transformers+peft (eager)" in rows
    assert not any("torch.compile" in name for name in rows), out  # --no-compile
    assert re.fullmatch(RATIO_RE, out.strip().splitlines()[-1]), out[-500:]
    # the ratio is the median of 3 pairs of tpp_jax and torch eager timed in turn (torch ms / tpp_jax ms per pair)
    pairs = {l.split(":")[0].strip(): [float(x) for x in l.split(":")[1].split()]
             for l in out.split("\npaired:")[1].splitlines()[1:] if l.startswith("  ")}
    assert set(pairs) == {"finetune", "mae"} and all(len(v) == 3 and min(v) > 0 for v in pairs.values()), out[-800:]
    final = re.fullmatch(RATIO_RE, out.strip().splitlines()[-1])
    for kind, got in zip(("finetune", "mae"), final.groups()):
      assert abs(float(got) - sorted(pairs[kind])[1]) <= 0.011, (kind, got, pairs)
  else:
    assert "ratio" not in out

  m = load_step_speed()
  # ViT-B/16 at 224 px: the published 17.56 G is multiply-adds (fvcore / timm 'GMACs'); at 2 FLOPs per
  # multiply-add the forward is 2 x 17.56 GFLOP.
  b16 = m.ViTConfig.from_variant("B/16", image_size=224)
  assert abs(m.vit_forward_flops(b16) / (2 * 17.56e9) - 1) < 0.02
  tiny = m.make_setup("tiny", None, None).vit
  xla = m.xla_forward_flops(tiny, batch=2)  # jax's own count of the tpp_jax ViT forward
  # XLA also counts the element-wise ops the analytic count leaves out, above all exact GELU (flax's erfc form,
  # ~64 FLOPs per MLP activation): at this width (192, MLP 768) they add ~6 % to the matmuls
  assert 0 <= xla / m.vit_forward_flops(tiny) - 1 < 0.08, (xla, m.vit_forward_flops(tiny))


def test_step_profile_groups_the_traced_ops_through_its_cli():
  """benchmarks/step_profile.py: every group row, shares summing to ~100 %, and some matmul and attention time."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--tiny", "--steps", "2"],
                     capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
          for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \| (\d+) % \|$", r.stdout, re.M)}
  assert len(rows) == 7, r.stdout
  assert 95 <= sum(share for _, share in rows.values()) <= 105
  assert rows["matmul: q/k/v/o, MLP, LoRA, head"][0] > 0 and rows["attention: QK^T, softmax, AV"][0] > 0
  m = re.search(r"wall ([\d.]+) ms/step .* traced ops ([\d.]+) ms/step summed over XLA's threads \(([\d.]+) cores",
                r.stdout)
  assert m and abs(float(m.group(2)) / float(m.group(1)) - float(m.group(3))) < 0.05, r.stdout[:600]


def test_step_profile_groups_gpu_kernels_by_their_xla_ops():
  """GPU kernels as an H200 trace named them (jax 0.11.2): cuBLAS custom calls and Triton GEMM fusions are matmuls,
  XLA's attention products (vmap'd einsums under attn/) and cuDNN's fused attention are attention."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  saved = os.environ.get("XLA_FLAGS")
  try:
    import step_profile  # sets XLA_FLAGS for its own run: not for the tests after this one
  finally:
    os.environ.pop("XLA_FLAGS", None) if saved is None else os.environ.__setitem__("XLA_FLAGS", saved)
  g = lambda instr, op: step_profile.group_of(instr, op, gpu=True)
  assert g("custom-call.59 nvjet_sm90_tst_256x128", "jit(step)/transpose(jvp(ViT))/blocks_2/mlp/fc1/dot_general") \
      == step_profile.GROUPS[0]
  assert g("gemm_fusion_dot.273 gemm_fusion_dot_265",
           "jit(step)/transpose(jvp(ViT))/blocks_9/attn/vmap(BTNH,BSNH->BNTS)/dot_general") == step_profile.GROUPS[1]
  assert g("custom-call.3 cudnn_fmha_fwd", "jit(step)/jvp(ViT)/blocks_0/attn/dot_product_attention") \
      == step_profile.GROUPS[1]
  assert g("loop_add_fusion.19", "jit(step)/transpose(jvp(ViT))/blocks_6/mlp/add_any") == step_profile.GROUPS[6]


def test_step_speed_stores_frozen_weights_as_the_engine_and_runs_one_step_kind():
  """bf16 compute: the frozen matrices are bf16 (build.storage_dtypes), trainable leaves fp32; --frozen-dtype float32
  keeps them fp32; --only mae prints the TPP row alone."""
  m = load_step_speed()
  for frozen_dtype, want in (("auto", "bfloat16"), ("float32", "float32")):
    js = m.jax_finetune(m.make_setup("tiny", None, "bfloat16", frozen_dtype=frozen_dtype))
    trainable, _, frozen, _ = jax.eval_shape(js.state)
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(frozen) if x.ndim >= 2} == {want}
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(trainable)} == {"float32"}
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--dtype", "bfloat16", "--only", "mae", "--no-torch",
                      "--attention", "xla", "--steps", "1", "--repeats", "1", "--warmup", "1"], cwd=ROOT,
                     env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert "(tpp_jax: attention xla, frozen weights bf16)" in r.stdout, r.stdout[:800]
  rows = [l.split("|")[1].strip() for l in r.stdout.splitlines() if l.startswith("| ") and "step" not in l[:8]]
  assert rows == ["TPP MAE+LoRA, tpp_jax"], r.stdout


def test_checkpoint_save_times_both_handlers_and_restores_the_same_arrays():
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_save.py"), "--pairs", "1", "--devices",
                      "2"], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert "185 arrays" in lines[0] and "replicated over 2 devices" in lines[0], r.stdout  # the demo fine-tune state
  assert "restored the same arrays: True" in lines
  m = re.fullmatch(r"save s: whole (\d+\.\d\d), orbax default (\d+\.\d\d)", lines[-1])
  assert m and all(float(x) > 0 for x in m.groups()), r.stdout
