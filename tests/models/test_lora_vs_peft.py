"""Our LoRA / DoRA / rsLoRA (models/peft.py) against HF peft on a transformers ViTModel, plus merge().

transformers 5 names the ViT attention projections q_proj/k_proj/v_proj/o_proj, so peft targets
['q_proj', 'v_proj'] and our PeftConfig targets ('q', 'v'). Run with -s to see the differences.
"""
import copy

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tpp_jax.checkpoints.convert import convert  # pylint: disable=wrong-import-position
from tpp_jax.models.peft import PeftConfig, merge  # pylint: disable=wrong-import-position
from tpp_jax.models.vit import ViT, ViTConfig  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers API

WIDTH, DEPTH, HEADS, MLP, PATCH, SIZE, RANK = 64, 2, 4, 128, 8, 32, 4
METHODS = {  # name -> (peft LoraConfig kwargs, our PeftConfig kwargs)
    "lora": ({}, dict(type="lora")),
    "dora": ({"use_dora": True}, dict(type="dora")),
    "rslora": ({"use_rslora": True}, dict(type="lora", rslora=True)),
}


def report(name, diff):
  print(f"\nMAXDIFF {name}: {diff:.3g}")
  return diff


def build(method, seed=0):
  """(HF base model, peft model with random non-zero LoRA weights, our PeftConfig, our ViTConfig)."""
  torch.manual_seed(seed)
  hcfg = transformers.ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                intermediate_size=MLP, patch_size=PATCH, image_size=SIZE, layer_norm_eps=1e-6)
  base = transformers.ViTModel(hcfg, add_pooling_layer=False).eval()
  with torch.no_grad():
    for p in base.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  extra, ours_kw = METHODS[method]
  lcfg = peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **extra)
  pmodel = peft.get_peft_model(copy.deepcopy(base), lcfg).eval()
  with torch.no_grad():
    for name, p in pmodel.named_parameters():
      if "lora_A" in name or "lora_B" in name:
        p.copy_(torch.randn_like(p) * 0.2)
      elif "lora_magnitude_vector" in name:
        p.mul_(1.0 + 0.2 * torch.rand_like(p))
  pcfg = PeftConfig(rank=RANK, alpha=8, targets=("q", "v"), **ours_kw)
  vcfg = ViTConfig(width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP, patch=PATCH, image_size=SIZE)
  return base, pmodel, pcfg, vcfg


def our_tree(base, pmodel, pcfg, vcfg):
  """Converted base weights + lora_a = A.T, lora_b = B.T (+ dora_m = magnitude)."""
  enc, _ = convert(base.state_dict(), vcfg)
  layers = pmodel.base_model.model.layers
  for i in range(DEPTH):
    for site, hf in (("q", "q_proj"), ("v", "v_proj")):
      mod = getattr(layers[i].attention, hf)
      leaf = enc[f"blocks_{i}"]["attn"][site]
      leaf["lora_a"] = mod.lora_A["default"].weight.detach().numpy().T.copy()
      leaf["lora_b"] = mod.lora_B["default"].weight.detach().numpy().T.copy()
      if pcfg.type == "dora":
        leaf["dora_m"] = mod.lora_magnitude_vector["default"].weight.detach().numpy().copy()
  want = jax.eval_shape(ViT(vcfg, pcfg).init, jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  assert jax.tree_util.tree_structure(want["params"]) == jax.tree_util.tree_structure(enc)
  return enc


def run(vcfg, pcfg, params, x):
  return np.asarray(ViT(vcfg, pcfg).apply({"params": params}, x.transpose(0, 2, 3, 1))["tokens"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_hf_peft_and_merge(method):
  base, pmodel, pcfg, vcfg = build(method)
  params = our_tree(base, pmodel, pcfg, vcfg)
  x = np.random.RandomState(1).randn(2, 3, SIZE, SIZE).astype(np.float32)
  with torch.no_grad():
    ref = pmodel(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    plain = base(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  out = run(vcfg, pcfg, params, x)
  assert np.abs(ref - plain).max() > 1e-2, "LoRA weights should change the output"
  assert report(f"{method}: ours vs HF peft (unmerged)", np.abs(out - ref).max()) <= 1e-4

  merged = merge(params, pcfg)
  out_merged = run(vcfg, PeftConfig(), merged, x)
  assert report(f"{method}: our merge() vs our unmerged", np.abs(out_merged - out).max()) <= 1e-5

  hf_merged = pmodel.merge_and_unload()
  with torch.no_grad():
    ref_merged = hf_merged(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  assert report(f"{method}: our merged tree vs HF merge_and_unload output",
                np.abs(out_merged - ref_merged).max()) <= 1e-4
  converted, _ = convert(hf_merged.state_dict(), vcfg)
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), merged, converted))
  assert report(f"{method}: convert(merge_and_unload weights) vs our merged weights", max(leaves)) <= 1e-5
  out_conv = run(vcfg, PeftConfig(), converted, x)
  assert report(f"{method}: convert(merge_and_unload) output vs HF merged output",
                np.abs(out_conv - ref_merged).max()) <= 1e-4
