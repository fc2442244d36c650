"""Training-step throughput: tpp_jax vs the PyTorch peer (transformers / peft), one table.

  python benchmarks/step_speed.py [--variant Ti/8 --depth 6 --image-size 64 --batch 64 --steps 10]

Rows
  MAE step, visible-only encoder (ours)        encoder sees the 25% visible patches (MAE paper)
  MAE step, full-token encoder (ours)          encoder sees all patches, masked ones replaced by a mask
                                               token (SimMIM-style) -- what MAE's design avoids
  MAE step, ViTMAEForPreTraining (PyTorch)     transformers' MAE, same sizes
  LoRA fine-tune step (ours)                   frozen backbone, LoRA r=8 on q,v + linear head
  LoRA fine-tune step, transformers+peft       the same with HF ViTModel + peft LoRA
Each step = forward + backward + AdamW update; images/s after warm-up, median of --repeats timings.
Runs on whatever jax / torch see (CPU here); set the thread counts equal for a fair comparison.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tpp_jax import partition
from tpp_jax.models.heads import ClassifierHead
from tpp_jax.models.mae import MAEDecoder, MAEDecoderConfig, mae_loss, random_masking
from tpp_jax.models.peft import PeftConfig
from tpp_jax.models.vit import ViT, ViTConfig


def timeit(fn, steps, repeats=3):
  fn()  # compile / warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      fn()
    times.append((time.perf_counter() - t0) / steps)
  return float(np.median(times))


def _runner(loss_fn, tx, params, opt):
  """A closure doing one jitted forward + backward + optimizer step (blocking)."""
  @jax.jit
  def step(p, o):
    l, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l

  state = [params, opt]
  def run():
    state[0], state[1], l = step(*state)
    l.block_until_ready()
  return run


def jax_mae_step(cfg, dec_cfg, batch, visible_only: bool):
  enc, dec = ViT(cfg), MAEDecoder(dec_cfg, cfg)
  x = jax.random.normal(jax.random.key(0), (batch, cfg.image_size, cfg.image_size, cfg.channels))
  noise = jax.random.uniform(jax.random.key(1), (batch, cfg.num_patches))
  keep, mask, restore = random_masking(noise, 0.75)
  pe = enc.init(jax.random.key(2), x)["params"]
  tokens = enc.apply({"params": pe}, x, keep_ids=keep)["tokens"]
  params = {"encoder": pe, "decoder": dec.init(jax.random.key(3), tokens, restore)["params"]}
  tx = optax.adamw(1e-4)
  opt = tx.init(params)
  full_restore = jnp.tile(jnp.arange(cfg.num_patches)[None], (batch, 1))

  def loss_fn(p):
    if visible_only:
      t = enc.apply({"params": p["encoder"]}, x, keep_ids=keep)["tokens"]
      pred = dec.apply({"params": p["decoder"]}, t, restore)
    else:  # SimMIM-style: every patch goes through the encoder, masked patches blanked
      pix_mask = jnp.repeat(jnp.repeat(mask.reshape(batch, cfg.grid, cfg.grid), cfg.patch, 1), cfg.patch, 2)
      t = enc.apply({"params": p["encoder"]}, x * (1 - pix_mask)[..., None])["tokens"]
      pred = dec.apply({"params": p["decoder"]}, t, full_restore)
    return mae_loss(pred, x, mask, cfg.patch, True)

  return _runner(loss_fn, tx, params, opt)


def jax_lora_step(cfg, batch):
  enc = ViT(cfg, PeftConfig(type="lora", rank=8, targets=("q", "v")))
  head = ClassifierHead(2)
  x = jax.random.normal(jax.random.key(0), (batch, cfg.image_size, cfg.image_size, cfg.channels))
  y = jnp.zeros((batch,), jnp.int32)
  params = {"encoder": enc.init(jax.random.key(1), x)["params"],
            "head": head.init(jax.random.key(2), jnp.zeros((1, cfg.width)))["params"]}
  labels = partition.label_tree(params, partition.default_rules("finetune", "lora"))
  tx = partition.make_optimizer(labels, optax.adamw(1e-3))
  opt = tx.init(params)

  def loss_fn(p):
    logits = head.apply({"params": p["head"]}, enc.apply({"params": p["encoder"]}, x)["pooled"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return _runner(loss_fn, tx, params, opt)


def torch_steps(cfg, dec_cfg, batch):
  import torch
  import transformers as tr
  from peft import LoraConfig, get_peft_model
  common = dict(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                intermediate_size=cfg.mlp_dim, image_size=cfg.image_size, patch_size=cfg.patch,
                num_channels=cfg.channels, hidden_act="gelu", layer_norm_eps=1e-6)
  x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
  mae = tr.ViTMAEForPreTraining(tr.ViTMAEConfig(**common, decoder_hidden_size=dec_cfg.width,
                                                decoder_num_hidden_layers=dec_cfg.depth,
                                                decoder_num_attention_heads=dec_cfg.heads,
                                                decoder_intermediate_size=dec_cfg.mlp_dim,
                                                mask_ratio=0.75, norm_pix_loss=True))
  opt = torch.optim.AdamW(mae.parameters(), 1e-4)
  def mae_step():
    opt.zero_grad(set_to_none=True)
    mae(pixel_values=x).loss.backward()
    opt.step()
  vit = tr.ViTModel(tr.ViTConfig(**common), add_pooling_layer=False)
  model = get_peft_model(vit, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
  head = torch.nn.Linear(cfg.width, 2)
  params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
  opt2 = torch.optim.AdamW(params, 1e-3)
  y = torch.zeros(batch, dtype=torch.long)
  def lora_step():
    opt2.zero_grad(set_to_none=True)
    h = model(pixel_values=x).last_hidden_state[:, 1:].mean(1)
    torch.nn.functional.cross_entropy(head(h), y).backward()
    opt2.step()
  return mae_step, lora_step, torch.get_num_threads()


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variant", default="Ti/8")
  ap.add_argument("--depth", type=int, default=6)
  ap.add_argument("--image-size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-torch", action="store_true")
  a = ap.parse_args()
  cfg = ViTConfig.from_variant(a.variant, depth=a.depth, image_size=a.image_size)
  dec = MAEDecoderConfig(width=128, depth=1, heads=4, mlp_dim=512)
  rows = [("MAE step, visible-only encoder (tpp_jax)", jax_mae_step(cfg, dec, a.batch, True)),
          ("MAE step, full-token encoder (tpp_jax)", jax_mae_step(cfg, dec, a.batch, False)),
          ("LoRA fine-tune step (tpp_jax)", jax_lora_step(cfg, a.batch))]
  threads = None
  if not a.no_torch:
    mae_step, lora_step, threads = torch_steps(cfg, dec, a.batch)
    rows.insert(2, ("MAE step, ViTMAEForPreTraining (PyTorch)", mae_step))
    rows.append(("LoRA fine-tune step, transformers + peft (PyTorch)", lora_step))
  print(f"ViT-{a.variant} depth {a.depth}, {a.image_size}px, batch {a.batch}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({jax.device_count()} device(s)); torch threads {threads}")
  print(f"| {'step':52s} | {'ms/step':>8s} | {'images/s':>9s} |")
  print(f"|{'-' * 54}|{'-' * 10}|{'-' * 11}|")
  for name, fn in rows:
    t = timeit(fn, a.steps, a.repeats)
    print(f"| {name:52s} | {t * 1e3:8.1f} | {a.batch / t:9.1f} |", flush=True)


if __name__ == "__main__":
  main()
