"""Training-step speed: tpp_jax vs PyTorch (transformers + peft), side by side, on whatever JAX sees.

  python benchmarks/step_speed.py                  # GPU/TPU: ViT-B/16, 224 px, batch 256, bf16
  python benchmarks/step_speed.py --small          # the demo size (the default when JAX runs on CPU)
  python benchmarks/step_speed.py --steps 3 --repeats 2 --no-compile --peak-tflops 989

Rows (each one step = forward + backward + AdamW update; ms/step is the median over --repeats timings of --steps
steps each, after --warmup steps and after compilation):
  LoRA fine-tune, tpp_jax                            frozen ViT, LoRA r=8 alpha=8 on q,v, linear head on the
                                                     mean-pooled patch tokens, cross-entropy. Only the trainable
                                                     leaves (LoRA + head) are differentiated: no gradient of a
                                                     frozen weight is computed (as requires_grad=False in torch)
  LoRA fine-tune, transformers+peft (eager)          the same with HF ViTModel (sdpa attention) + peft LoRA
  LoRA fine-tune, transformers+peft (torch.compile)  the same, forward + loss torch.compile'd
  TPP MAE+LoRA, tpp_jax                              target-parameter pre-training: frozen ViT with LoRA on q,v,
                                                     MAE's visible-only encoding (25 % of the patches), MAE
                                                     decoder, norm-pix loss on the masked patches; trainable =
                                                     LoRA + decoder (the `tpp` stage's partition)
  TPP MAE+LoRA, transformers+peft (eager / torch.compile)
                                                     HF ViTMAEForPreTraining (mask ratio 0.75, norm_pix_loss),
                                                     peft LoRA on the encoder's q,v, decoder trainable

Sizes: the default on GPU/TPU is ViT-B/16 at 224 px, batch 256, bf16 compute (tpp_jax ViTConfig(dtype='bfloat16'),
torch autocast), MAE's decoder (512 wide, 8 deep, 16 heads); `--small` (the default on CPU) is the demo size:
ViT-Ti/8 with 6 blocks at 64 px, batch 64, fp32, a 128-wide 1-deep decoder. Both frameworks run on one device
(JAX's first device; torch on CUDA when JAX runs on GPU, on CPU when JAX does; no torch rows on TPU).

Columns: TFLOP/s uses the analytic model FLOPs printed above the table (multiply-add = 2 FLOPs); MFU = TFLOP/s / the
device's dense bf16 peak (a built-in table, or --peak-tflops); peak mem and the optimizer-state column are explained
in the footnotes the script prints. CPU is a test / demo backend here: its numbers are for the scripts' own checks.

When PyTorch is importable the last line is
  ratio tpp_jax/pytorch: finetune X.XXx, mae X.XXx
(tpp_jax images/s / transformers+peft eager images/s, same shapes). With --pairs N (the default on CPU: 5) it comes
from N pairs, each tpp_jax and torch eager timed one right after the other (--steps steps each, the order alternating
from pair to pair), as the median of the N per-pair ratios: a shared machine's speed drifts over the minutes the
table's rows take one after another, and the pairs keep that drift out of the ratio.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share one GPU: no 75 % up-front grab

import argparse
import dataclasses
import gc
import re
import statistics
import sys
import time
import warnings
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tpp_jax import build as build_lib
from tpp_jax import partition
from tpp_jax import tree as tree_lib
from tpp_jax.models.heads import ClassifierHead
from tpp_jax.models.mae import MAEDecoder, MAEDecoderConfig, mae_loss, random_masking
from tpp_jax.models.peft import PeftConfig
from tpp_jax.models.vit import ViT, ViTConfig

LORA = PeftConfig(type="lora", rank=8, alpha=8.0, targets=("q", "v"))
MASK_RATIO = 0.75
NUM_CLASSES = 10
LR = 1e-4

# Dense bf16 peak FLOP/s per chip, matched on the lower-cased jax device_kind (first match wins).
PEAK_BF16 = (
    (r"h100.*pcie", 756e12), (r"h100", 989e12), (r"h200", 989e12), (r"a100", 312e12), (r"\bl4\b", 121e12),
    (r"v5 ?lite|v5e", 197e12), (r"v5p|v5", 459e12), (r"v6 ?lite|v6e", 918e12), (r"v4", 275e12),
)


@dataclasses.dataclass(frozen=True)
class Setup:
  name: str
  vit: ViTConfig
  dec: MAEDecoderConfig
  batch: int
  frozen_dtype: str = "auto"  # the engine's model.frozen_dtype: frozen matrices stored in bf16 when computing in bf16

  @property
  def visible(self) -> int:
    """Patches the MAE encoder sees (random_masking's K)."""
    return int(self.vit.num_patches * (1 - MASK_RATIO))


def make_setup(size: str, batch: int | None, dtype: str | None, attention: str = "auto",
               frozen_dtype: str = "auto") -> Setup:
  """'full' (ViT-B/16, 224 px, MAE's decoder), 'small' (the demo size) or 'tiny' (the test's).

  attention / frozen_dtype: the engine's model.attention and model.frozen_dtype."""
  small_dec = MAEDecoderConfig(width=128, depth=1, heads=4, mlp_dim=512)
  if size == "full":
    name, variant, kw, dec = "ViT-B/16, 224 px", "B/16", dict(image_size=224), MAEDecoderConfig(512, 8, 16, 2048)
  elif size == "small":
    name, variant, kw, dec = "ViT-Ti/8, 6 blocks, 64 px", "Ti/8", dict(depth=6, image_size=64), small_dec
  else:
    name, variant, kw, dec = "ViT-Ti/8, 1 block, 32 px (tiny)", "Ti/8", dict(depth=1, image_size=32), small_dec
  vit = ViTConfig.from_variant(variant, dtype=dtype or ("bfloat16" if size == "full" else "float32"),
                               attention=attention, **kw)
  default_batch = {"full": 256, "small": 64}.get(size, 4)
  return Setup(name, vit, dec, batch or default_batch, frozen_dtype)


# ------------------------------------------------------------------------------------------------------------------
# Analytic model FLOPs (per image; a multiply-add is 2 FLOPs; elementwise ops, norms and softmax are not counted)
# ------------------------------------------------------------------------------------------------------------------

def block_flops(tokens: int, width: int, mlp_dim: int) -> dict[str, int]:
  """One transformer block: the weight matmuls (q, k, v, o, fc1, fc2) and the attention core (QK^T, PV)."""
  return {"dense": 2 * tokens * (4 * width * width + 2 * width * mlp_dim), "attn": 2 * 2 * tokens * tokens * width}


def vit_flop_parts(cfg: ViTConfig, tokens: int | None = None, lora: PeftConfig | None = None) -> dict[str, int]:
  """Forward FLOPs of a ViT by part: patch embedding (all N patches), dense, attention core, LoRA.

  tokens: the tokens the blocks see, cls included (default N + 1; MAE's visible-only encoder sees K + 1).
  """
  t = cfg.num_patches + 1 if tokens is None else tokens
  blk = block_flops(t, cfg.width, cfg.mlp_dim)
  sites = len(lora.targets) if lora is not None and lora.type == "lora" else 0
  return {"patch": 2 * cfg.num_patches * cfg.patch ** 2 * cfg.channels * cfg.width,
          "dense": cfg.depth * blk["dense"], "attn": cfg.depth * blk["attn"],
          "lora": cfg.depth * sites * 2 * t * 2 * cfg.width * (lora.rank if sites else 0)}


def vit_forward_flops(cfg: ViTConfig, tokens: int | None = None) -> int:
  """Forward FLOPs per image of a plain ViT: depth * [2T(4D^2 + 2DM) + 4T^2 D] + 2 N P^2 C D."""
  return sum(vit_flop_parts(cfg, tokens).values())


def decoder_forward_flops(vit: ViTConfig, dec: MAEDecoderConfig, visible: int) -> int:
  """MAE decoder forward per image: embed (K+1 tokens) + blocks and pixel predictor (N+1 tokens)."""
  n = vit.num_patches
  blk = block_flops(n + 1, dec.width, dec.mlp_dim)
  return (2 * (visible + 1) * vit.width * dec.width + dec.depth * (blk["dense"] + blk["attn"])
          + 2 * (n + 1) * dec.width * vit.patch ** 2 * vit.channels)


def finetune_step_flops(cfg: ViTConfig) -> int:
  """patch + 2 x frozen matmuls (forward + input gradient) + 3 x (attention core, LoRA, head): backward of a
  matmul with no trainable weight costs 1 x forward (dX), of attention's QK^T / PV 2 x (both operands), of a trained
  weight 2 x (dX and dW); the patch embedding needs no backward."""
  p = vit_flop_parts(cfg, lora=LORA)
  return p["patch"] + 2 * p["dense"] + 3 * (p["attn"] + p["lora"] + 2 * cfg.width * NUM_CLASSES)


def tpp_step_flops(s: Setup) -> int:
  """The encoder on the K + 1 visible tokens as finetune_step_flops (patch embedding on all N), + 3 x decoder."""
  p = vit_flop_parts(s.vit, tokens=s.visible + 1, lora=LORA)
  return p["patch"] + 2 * p["dense"] + 3 * (p["attn"] + p["lora"] + decoder_forward_flops(s.vit, s.dec, s.visible))


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled jax computation by XLA's cost analysis (None if the backend has none)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 -- some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and "flops" in ca else None


def xla_forward_flops(cfg: ViTConfig, batch: int = 1) -> float | None:
  """XLA's count for the tpp_jax ViT forward (no PEFT), per image."""
  vit = ViT(cfg)
  shape = (batch, cfg.image_size, cfg.image_size, cfg.channels)
  params = jax.eval_shape(lambda: vit.init(jax.random.key(0), jnp.zeros((1, *shape[1:]))))["params"]
  fwd = jax.jit(lambda p, x: vit.apply({"params": p}, x)["tokens"])
  flops = xla_flops(fwd.lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile())
  return None if flops is None else flops / batch


# ------------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
  """A ready-to-time training step: run() dispatches one step, sync() waits for the device."""
  run: Callable[[], None]
  sync: Callable[[], None]
  opt_ratio: Callable[[], float]   # optimizer-state bytes / trainable-parameter bytes
  peak_mem: Callable[[], str]      # read after the timing


def time_step(step: Step, steps: int, repeats: int, warmup: int) -> float:
  """Median seconds per step over `repeats` timings of `steps` steps, after `warmup` steps."""
  for _ in range(warmup):
    step.run()
  step.sync()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      step.run()
    step.sync()
    times.append((time.perf_counter() - t0) / steps)
  return statistics.median(times)


def fmt_bytes(n: float) -> str:
  return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


# ------------------------------------------------------------------------------------------------------------------
# tpp_jax steps
# ------------------------------------------------------------------------------------------------------------------

def split_trainable(params, labels):
  """(trainable, frozen) nested trees of `params` by partition label (build_lib.split_trainable, nested)."""
  return tuple(tree_lib.unflatten(part) for part in build_lib.split_trainable(params, labels))


def merge(trainable, frozen):
  return tree_lib.unflatten({**tree_lib.flatten(frozen), **tree_lib.flatten(trainable)})


class JaxStep:
  """One jitted step of `loss_fn(params, batch)` over the leaves that `rules` do not label frozen.

  Compiled at construction from shapes only (so the FLOP counts can be printed before anything is allocated);
  start() allocates the parameters and optimizer state. The trainable tree and the optimizer state are donated
  off CPU; the frozen tree is an argument, not a constant baked into the executable.
  """

  def __init__(self, init_fn, loss_fn, rules, setup: Setup | None = None):
    """init_fn() -> (params, batch): full-size concrete arrays (only traced here). setup: its compute dtype and
    frozen_dtype store the frozen weight matrices as the engine does (build_lib.storage_dtypes)."""
    self.init_fn = init_fn
    self.storage = None if setup is None else ml_collections.ConfigDict(
        {"model": {"dtype": setup.vit.dtype, "frozen_dtype": setup.frozen_dtype}})
    shapes, _ = jax.eval_shape(init_fn)
    labels = partition.label_tree(shapes, rules)
    train_labels, _ = split_trainable(labels, labels)
    self.rules, self.tx = rules, partition.make_optimizer(train_labels, optax.adamw(LR))

    def step(trainable, opt, frozen, batch):
      loss, grads = jax.value_and_grad(lambda t: loss_fn(merge(t, frozen), batch))(trainable)
      updates, opt = self.tx.update(grads, opt, trainable)
      return optax.apply_updates(trainable, updates), opt, loss

    donate = (0, 1) if jax.default_backend() != "cpu" else ()
    self.compiled = jax.jit(step, donate_argnums=donate).lower(*jax.eval_shape(self.state)).compile()
    self.flops = xla_flops(self.compiled)

  def state(self):
    params, batch = self.init_fn()
    labels = partition.label_tree(params, self.rules)
    if self.storage is not None:
      params, _ = build_lib.storage_dtypes(self.storage, params, {}, labels)
    trainable, frozen = split_trainable(params, labels)
    return trainable, self.tx.init(trainable), frozen, batch

  def start(self, peak_seen: list[float]) -> Step:
    """peak_seen: [the process's device peak so far] (jax cannot reset its peak counter), updated here."""
    trainable, opt, frozen, batch = jax.block_until_ready(self.state())
    st = {"t": trainable, "o": opt, "loss": None}

    def run():
      st["t"], st["o"], st["loss"] = self.compiled(st["t"], st["o"], frozen, batch)

    def opt_ratio():
      nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
      return nbytes(st["o"]) / nbytes(st["t"])

    def peak_mem():
      stats = jax.devices()[0].memory_stats() or {}
      if "peak_bytes_in_use" not in stats:  # CPU: XLA's own estimate of the compiled step
        m = self.compiled.memory_analysis()
        if m is None:
          return "–"
        return "~" + fmt_bytes(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                               + m.temp_size_in_bytes)
      peak, before = stats["peak_bytes_in_use"], peak_seen[0]
      peak_seen[0] = max(before, peak)
      return fmt_bytes(peak) if peak > before else "≤ " + fmt_bytes(before)

    return Step(run, lambda: jax.block_until_ready(st), opt_ratio, peak_mem)


def images(s: Setup, batch: int):
  return jax.random.normal(jax.random.key(0), (batch, s.vit.image_size, s.vit.image_size, s.vit.channels))


def jax_finetune(s: Setup) -> JaxStep:
  enc, head = ViT(s.vit, LORA), ClassifierHead(NUM_CLASSES)

  def init_fn():
    params = {"encoder": enc.init(jax.random.key(1), images(s, 1))["params"],
              "head": head.init(jax.random.key(2), jnp.zeros((1, s.vit.width)))["params"]}
    return params, (images(s, s.batch), jax.random.randint(jax.random.key(3), (s.batch,), 0, NUM_CLASSES))

  def loss_fn(params, batch):
    x, y = batch
    tokens = enc.apply({"params": params["encoder"]}, x)["tokens"]
    logits = head.apply({"params": params["head"]}, tokens[:, 1:].mean(axis=1))  # as the torch row
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return JaxStep(init_fn, loss_fn, partition.default_rules("finetune", "lora"), s)


def jax_tpp(s: Setup) -> JaxStep:
  enc, dec = ViT(s.vit, LORA), MAEDecoder(s.dec, s.vit)
  n = s.vit.num_patches

  def init_fn():
    tokens = jnp.zeros((1, s.visible + 1, s.vit.width))
    params = {"encoder": enc.init(jax.random.key(1), images(s, 1))["params"],
              "decoder": dec.init(jax.random.key(2), tokens, jnp.arange(n)[None])["params"]}
    return params, (images(s, s.batch), jax.random.key(3))

  def loss_fn(params, batch):
    x, key = batch
    keep, mask, restore = random_masking(jax.random.uniform(key, (x.shape[0], n)), MASK_RATIO)  # in the step
    tokens = enc.apply({"params": params["encoder"]}, x, keep_ids=keep)["tokens"]
    pred = dec.apply({"params": params["decoder"]}, tokens, restore)
    return mae_loss(pred, x, mask, s.vit.patch, True)

  # the tpp stage: LoRA + decoder trained, encoder and the fixed sin-cos decoder position embedding frozen
  return JaxStep(init_fn, loss_fn, partition.default_rules("tpp", "lora", fixed_pos_emb=True), s)


# ------------------------------------------------------------------------------------------------------------------
# PyTorch steps (transformers + peft)
# ------------------------------------------------------------------------------------------------------------------

def torch_modules():
  """(torch, transformers, peft) or None when any is missing."""
  try:
    import peft
    import torch
    import transformers
  except ImportError:
    return None
  warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")  # peft calls deprecated names
  return torch, transformers, peft


def torch_device(torch) -> str | None:
  """torch's device matching JAX's platform (None: no such device, e.g. JAX on TPU)."""
  platform = jax.default_backend()
  if platform == "cpu":
    return "cpu"
  if platform in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
    return "cuda"
  return None


def hf_kwargs(cfg: ViTConfig) -> dict:
  return dict(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
              intermediate_size=cfg.mlp_dim, image_size=cfg.image_size, patch_size=cfg.patch,
              num_channels=cfg.channels, hidden_act="gelu", layer_norm_eps=cfg.ln_eps, attn_implementation="sdpa")


def qv_names(model) -> tuple[str, str]:
  """The query / value projection names of HF ViT attention: q_proj / v_proj (transformers 5) or query / value."""
  leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
  return ("q_proj", "v_proj") if "q_proj" in leaves else ("query", "value")


class TorchStep:
  """One step of `loss_fn()` + backward + AdamW over `params` (fused on CUDA), under bf16 autocast if asked."""

  def __init__(self, loss_fn, params, device: str, dtype: str, compile_: bool):
    import torch
    self.torch, self.device = torch, device
    self.loss_fn = torch.compile(loss_fn) if compile_ else loss_fn
    self.params = params
    self.opt = torch.optim.AdamW(params, lr=LR, fused=True if device == "cuda" else None)
    self.autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def start(self) -> Step:
    torch = self.torch
    if self.device == "cuda":
      torch.cuda.reset_peak_memory_stats()

    def run():
      self.opt.zero_grad(set_to_none=True)
      with torch.autocast(**self.autocast):
        loss = self.loss_fn()
      loss.backward()
      self.opt.step()

    def opt_ratio():
      state = sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                  if torch.is_tensor(t))
      return state / sum(p.numel() * p.element_size() for p in self.params)

    def peak_mem():
      return fmt_bytes(torch.cuda.max_memory_allocated()) if self.device == "cuda" else "–"

    sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
    return Step(run, sync, opt_ratio, peak_mem)


def torch_finetune(s: Setup, device: str, dtype: str, compile_: bool) -> TorchStep:
  torch, tr, peft = torch_modules()
  torch.manual_seed(0)
  vit = tr.ViTModel(tr.ViTConfig(**hf_kwargs(s.vit)), add_pooling_layer=False)
  model = peft.get_peft_model(vit, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha,
                                                   target_modules=list(qv_names(vit)))).to(device)
  head = torch.nn.Linear(s.vit.width, NUM_CLASSES).to(device)
  x = torch.randn(s.batch, s.vit.channels, s.vit.image_size, s.vit.image_size, device=device)
  y = torch.randint(0, NUM_CLASSES, (s.batch,), device=device)

  def loss_fn():
    feats = model(pixel_values=x).last_hidden_state[:, 1:].mean(1)
    return torch.nn.functional.cross_entropy(head(feats).float(), y)

  params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
  return TorchStep(loss_fn, params, device, dtype, compile_)


def torch_tpp(s: Setup, device: str, dtype: str, compile_: bool) -> TorchStep:
  torch, tr, peft = torch_modules()
  torch.manual_seed(0)
  mae = tr.ViTMAEForPreTraining(tr.ViTMAEConfig(
      **hf_kwargs(s.vit), decoder_hidden_size=s.dec.width, decoder_num_hidden_layers=s.dec.depth,
      decoder_num_attention_heads=s.dec.heads, decoder_intermediate_size=s.dec.mlp_dim, mask_ratio=MASK_RATIO,
      norm_pix_loss=True))
  q, v = qv_names(mae.vit)
  target = rf"vit\..*\.({q}|{v})"  # the encoder's q, v only (peft full-matches a string against module names)
  model = peft.get_peft_model(mae, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=target))
  for name, p in model.named_parameters():  # the decoder trains, except its fixed sin-cos position embedding
    if ".decoder." in name and not name.endswith("decoder_pos_embed"):
      p.requires_grad_(True)
  model.to(device)
  x = torch.randn(s.batch, s.vit.channels, s.vit.image_size, s.vit.image_size, device=device)
  params = [p for p in model.parameters() if p.requires_grad]
  return TorchStep(lambda: model(pixel_values=x).loss, params, device, dtype, compile_)


def free_torch():
  mods = torch_modules()
  gc.collect()
  if mods and mods[0].cuda.is_available():
    mods[0].cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
  name: str
  kind: str                     # finetune | mae
  impl: str                     # jax | eager | compile
  make: Callable[[], Step]      # builds / allocates the step (errors of torch.compile surface when it runs)


def detect_peak(override_tflops: float | None) -> tuple[float | None, str]:
  if override_tflops:
    return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
  kind = jax.devices()[0].device_kind
  if jax.default_backend() != "cpu":
    for pattern, peak in PEAK_BF16:
      if re.search(pattern, kind.lower()):
        return peak, f"{peak / 1e12:g} TFLOP/s dense bf16 ({kind})"
  return None, f"unknown for {kind!r}: give --peak-tflops"


COLUMNS = ("step", "ms/step", "images/s", "TFLOP/s", "MFU", "peak mem", "opt state / trainable")


def table_line(cells) -> str:
  return "| " + " | ".join(cells) + " |"


def measure(row: Row, a, flops: dict[str, float], peak: float | None) -> tuple[list[str], float | None]:
  """The row's cells and its images/s (None when the step failed: torch.compile only)."""
  try:
    step = row.make()
    t = time_step(step, a.steps, a.repeats, a.warmup)
  except Exception as e:  # noqa: BLE001 -- e.g. torch.compile without a working C compiler
    if row.impl != "compile":
      raise
    import torch
    torch._dynamo.reset()
    reason = (str(e).strip().splitlines() or [""])[0][:100]
    return [row.name, f"failed: {type(e).__name__}: {reason}"] + ["–"] * (len(COLUMNS) - 2), None
  tflops = flops[row.kind] * a.batch / t / 1e12
  mfu = f"{100 * tflops * 1e12 / peak:.1f} %" if peak else "–"
  cells = [row.name, f"{t * 1e3:.1f}", f"{a.batch / t:.1f}", f"{tflops:.3f}", mfu, step.peak_mem(),
           f"{step.opt_ratio():.2f}"]
  return cells, a.batch / t


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  size = ap.add_mutually_exclusive_group()
  size.add_argument("--small", dest="size", action="store_const", const="small",
                    help="the demo size (ViT-Ti/8, 6 blocks, 64 px, batch 64, fp32); the default on CPU")
  size.add_argument("--full", dest="size", action="store_const", const="full",
                    help="ViT-B/16, 224 px, batch 256, bf16; the default on GPU/TPU")
  size.add_argument("--tiny", dest="size", action="store_const", const="tiny", help=argparse.SUPPRESS)  # tests
  ap.add_argument("--batch", type=int, help="images per step (default 256 full, 64 small)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default bf16 full, fp32 small)")
  ap.add_argument("--steps", type=int, default=10, help="steps per timing")
  ap.add_argument("--repeats", type=int, default=3, help="timings; the median is reported")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (torch.compile compiles in them)")
  ap.add_argument("--no-torch", action="store_true", help="tpp_jax rows only")
  ap.add_argument("--only", choices=("finetune", "mae"), help="the rows of one step only")
  ap.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                  help="tpp_jax's model.attention (auto: cuDNN fused attention on GPU in bf16)")
  ap.add_argument("--frozen-dtype", choices=("auto", "float32"), default="auto",
                  help="tpp_jax's model.frozen_dtype (auto: frozen weight matrices stored in bf16 when computing in "
                       "bf16, as the engine does)")
  ap.add_argument("--no-compile", action="store_true", help="no torch.compile rows")
  ap.add_argument("--pairs", type=int, help="the ratio line from N pairs of tpp_jax and torch eager timed in turn "
                  "(default: 5 on CPU; 0 = from the table's rows, the default on GPU / TPU)")
  ap.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: built-in table)")
  a = ap.parse_args(argv)
  a.size = a.size or ("small" if jax.default_backend() == "cpu" else "full")
  if a.pairs is None:
    a.pairs = 5 if jax.default_backend() == "cpu" else 0
  return a


def paired_ratio(jax_step: Step, torch_step: Step, pairs: int, steps: int, warmup: int) -> tuple[float, list[float]]:
  """The median over `pairs` of (torch seconds / tpp_jax seconds) per step, each pair's two timings of `steps` steps
  taken one right after the other, tpp_jax first in even pairs and torch first in odd ones; and the pair ratios."""
  for step in (jax_step, torch_step):
    time_step(step, 1, 1, warmup)
  ratios = []
  for i in range(pairs):
    order = (jax_step, torch_step) if i % 2 == 0 else (torch_step, jax_step)
    t = {id(step): time_step(step, steps, 1, 0) for step in order}
    ratios.append(t[id(torch_step)] / t[id(jax_step)])
  return statistics.median(ratios), ratios


def main(argv=None):
  a = parse_args(argv)
  s = make_setup(a.size, a.batch, a.dtype, a.attention, a.frozen_dtype)
  a.batch, dtype = s.batch, s.vit.dtype
  mods = None if a.no_torch else torch_modules()
  device = torch_device(mods[0]) if mods else None
  if device == "cuda" and dtype == "float32":
    mods[0].set_float32_matmul_precision("high")  # TF32, as XLA's default precision for fp32 dots on GPU

  dev = jax.devices()[0]
  torch_info = "torch: not used" if a.no_torch else "torch: not importable"
  if mods:
    torch_info = (f"torch {mods[0].__version__} on {device or 'no matching device (no torch rows)'}, "
                  f"transformers {mods[1].__version__}, peft {mods[2].__version__}")
  print(f"jax {jax.__version__} on {jax.device_count()} x {dev.device_kind} ({dev.platform}; timed on one) | "
        f"{torch_info}")
  print(f"{s.name}, batch {s.batch}, {dtype} (tpp_jax: attention {a.attention}, frozen weights "
        f"{'bf16' if dtype == 'bfloat16' and a.frozen_dtype == 'auto' else 'fp32'}); MAE decoder {s.dec.width} wide "
        f"x {s.dec.depth} deep; LoRA r={LORA.rank} "
        f"alpha={LORA.alpha:g} on q,v; {NUM_CLASSES} classes; median of {a.repeats} x {a.steps} steps after "
        f"{a.warmup} warm-up")

  # tpp_jax steps are compiled from shapes first, for XLA's FLOP counts
  kinds = (a.only,) if a.only else ("finetune", "mae")
  jax_steps = {k: (jax_finetune if k == "finetune" else jax_tpp)(s) for k in kinds}
  compiled = dict(jax_steps)  # the rows take their step from jax_steps; the pairs start theirs again from here
  flops = {"finetune": finetune_step_flops(s.vit), "mae": tpp_step_flops(s)}
  xla = {k: (jax_steps[k].flops / s.batch if k in jax_steps and jax_steps[k].flops else None)
         for k in ("finetune", "mae")}
  if jax.default_backend() == "gpu":  # XLA:GPU's count leaves out the matmuls it hands to cuBLAS custom calls
    xla = {k: None for k in xla}
  g = lambda f: "n/a" if f is None else f"{f / 1e9:.3f}"
  t_all, k = s.vit.num_patches + 1, s.visible + 1
  print("\nModel FLOPs per image, GFLOP (analytic, multiply-add = 2; XLA = jax's cost_analysis() of the compiled "
        "tpp_jax computation):")
  print(f"  ViT forward, {t_all} tokens   {g(vit_forward_flops(s.vit))} (XLA {g(xla_forward_flops(s.vit))})   "
        "depth x [2T(4D^2 + 2DM) + 4T^2 D] + patch embedding 2N P^2 C D")
  print(f"  LoRA fine-tune step      {g(flops['finetune'])} (XLA {g(xla['finetune'])})   patch + 2 x frozen matmuls "
        "+ 3 x (attention T^2 matmuls + LoRA + head)")
  print(f"  TPP MAE+LoRA step        {g(flops['mae'])} (XLA {g(xla['mae'])})   encoder on the {k} visible tokens "
        "(same rule, patch embedding on all N) + 3 x decoder forward")
  peak, peak_note = detect_peak(a.peak_tflops)

  peak_seen = [0.0]
  rows = []
  for kind, title in (("finetune", "LoRA fine-tune"), ("mae", "TPP MAE+LoRA")):
    if kind not in kinds:
      continue
    rows.append(Row(f"{title}, tpp_jax", kind, "jax", lambda kind=kind: jax_steps.pop(kind).start(peak_seen)))
    build = torch_finetune if kind == "finetune" else torch_tpp
    if device:
      rows.append(Row(f"{title}, transformers+peft (eager)", kind, "eager",
                      lambda b=build: b(s, device, dtype, False).start()))
      if not a.no_compile:
        rows.append(Row(f"{title}, transformers+peft (torch.compile)", kind, "compile",
                        lambda b=build: b(s, device, dtype, True).start()))

  print()
  print(table_line(COLUMNS))
  print("|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|", flush=True)
  ips: dict[tuple[str, str], float] = {}
  for row in rows:
    cells, rate = measure(row, a, flops, peak)
    print(table_line(cells), flush=True)
    if rate is not None:
      ips[(row.kind, row.impl)] = rate
    free_torch()

  print(f"\nTFLOP/s: the analytic step FLOPs above x images/s. MFU: vs {peak_note}.")
  print("peak mem: device peak bytes (jax memory_stats()['peak_bytes_in_use'], a process-wide counter: '≤ X' = this "
        "row stayed under the peak of an earlier row; torch.cuda.max_memory_allocated()). Where jax has no device "
        "counter (CPU), '~X' is XLA's estimate for the compiled step (arguments + outputs - donated + temporaries) "
        "and torch shows –.")
  print("opt state / trainable: optimizer-state bytes / trainable-parameter bytes (AdamW: m and v, 2.00 in fp32).")
  if mods and device:
    ratios = {k: ips[(k, "jax")] / ips[(k, "eager")] for k in kinds}
    if a.pairs > 0:
      steps = f"{a.steps} step{'s' if a.steps > 1 else ''}"
      print(f"\npaired: tpp_jax and transformers+peft eager timed in turn, {a.pairs} pairs of {steps} "
            "(torch ms / tpp_jax ms per pair; the ratio below is their median):")
      for kind in kinds:
        build = torch_finetune if kind == "finetune" else torch_tpp
        ratios[kind], each = paired_ratio(compiled[kind].start(peak_seen), build(s, device, dtype, False).start(),
                                          a.pairs, a.steps, a.warmup)
        print(f"  {kind}: " + " ".join(f"{r:.2f}" for r in each))
        free_torch()
    ratio = lambda kind: f"{ratios[kind]:.2f}x" if kind in kinds else "–"
    print(f"ratio tpp_jax/pytorch: finetune {ratio('finetune')}, mae {ratio('mae')}")


if __name__ == "__main__":
  main()
