"""benchmarks/step_speed.py: the side-by-side step table runs end to end, and its analytic FLOP counts are right."""
import importlib.util
import os
import re
import subprocess
import sys

from tpp_jax import hugepages

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "step_speed.py"
RATIO_RE = r"ratio tpp_jax/pytorch: finetune \d+\.\d\dx, mae \d+\.\d\dx"


def load_step_speed():
  spec = importlib.util.spec_from_file_location("step_speed", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["step_speed"] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


def torch_peers() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def test_step_speed_table_and_flops():
  drop = ("XLA_FLAGS", "GLIBC_TUNABLES", "TPP_HUGEPAGES_REEXEC")
  env = {k: v for k, v in os.environ.items() if k not in drop}  # one CPU device, as a plain run
  r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--repeats", "1", "--warmup", "1",
                      "--no-compile"], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                     text=True, timeout=300)
  out = r.stdout
  assert r.returncode == 0, (out + r.stderr)[-3000:]
  rows = {l.split("|")[1].strip(): l for l in out.splitlines() if l.startswith("| ")}
  supported = hugepages.tunables_with_hugepages({}) is not None  # re-executed with them, as the CLI
  assert f"glibc huge pages {'on' if supported else 'off'}" in out.splitlines()[0], out[:500]
  for name in ("LoRA fine-tune, tpp_jax", "TPP MAE+LoRA, tpp_jax"):
    assert name in rows, out
    ms = rows[name].split("|")[2].strip()
    assert float(ms) > 0, rows[name]
    assert rows[name].rstrip(" |").endswith("2.00"), rows[name]  # AdamW: m + v in fp32 per trainable param
  if torch_peers():
    assert "LoRA fine-tune, transformers+peft (eager)" in rows and "TPP MAE+LoRA, transformers+peft (eager)" in rows
    assert not any("torch.compile" in name for name in rows), out  # --no-compile
    assert re.fullmatch(RATIO_RE, out.strip().splitlines()[-1]), out[-500:]
  else:
    assert "ratio" not in out

  m = load_step_speed()
  # ViT-B/16 at 224 px: the published 17.56 G is multiply-adds (fvcore / timm 'GMACs'); at 2 FLOPs per
  # multiply-add the forward is 2 x 17.56 GFLOP.
  b16 = m.ViTConfig.from_variant("B/16", image_size=224)
  assert abs(m.vit_forward_flops(b16) / (2 * 17.56e9) - 1) < 0.02
  tiny = m.make_setup("tiny", None, None).vit
  xla = m.xla_forward_flops(tiny, batch=2)  # jax's own count of the tpp_jax ViT forward
  assert abs(xla / m.vit_forward_flops(tiny) - 1) < 0.05, (xla, m.vit_forward_flops(tiny))


def test_step_speed_cpu_devices_splits_the_batch_over_them():
  """--cpu-devices 2: the tpp_jax rows run data-parallel on two CPU devices (as TPP_CPU_DEVICES=2 in the engine)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--repeats", "1", "--warmup", "1",
                      "--no-torch", "--cpu-devices", "2"], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert "on 2 x cpu (cpu; the batch split over all)" in r.stdout, r.stdout[:500]
  rows = [l for l in r.stdout.splitlines() if l.startswith("| ") and "tpp_jax" in l]
  assert len(rows) == 2 and all(float(l.split("|")[2]) > 0 for l in rows), r.stdout
  r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--no-torch", "--cpu-devices", "3"], cwd=ROOT,
                     env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "must be a multiple of --cpu-devices 3" in r.stderr, r.stderr[-1000:]


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
