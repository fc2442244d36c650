"""checkpoints/convert.py against PyTorch references (transformers ViT / ViTMAE / Dinov2, random weights).

The timm / MAE-official / big_vision fixtures are made here by renaming HF weights with mapping code
written independently of the library. Run with -s to see the measured max abs differences.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tpp_jax import tree as tree_lib  # pylint: disable=wrong-import-position
from tpp_jax.checkpoints import convert as cv  # pylint: disable=wrong-import-position
from tpp_jax.models.mae import MAEDecoder, random_masking  # pylint: disable=wrong-import-position
from tpp_jax.models.vit import ViT, ViTConfig  # pylint: disable=wrong-import-position

from conftest import one_error_line, run_cli  # pylint: disable=wrong-import-position

TOL = 1e-4
# (width, depth, heads, mlp_dim, patch) of the two test model sizes; HF models are built at 32 px.
SIZES = {"w64d2": (64, 2, 4, 128, 8), "w48d3": (48, 3, 3, 96, 4)}


def report(name, diff):
  print(f"\nMAXDIFF {name}: {diff:.3g}")
  return diff


def perturb(model, seed=0, scale=0.05):
  """HF inits LayerNorms to (1, 0), Dinov2 LayerScale to 1, ViTMAE pos-emb to 0: make them all distinct."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return model.eval()


def images(size, batch=2, seed=0):
  return np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)


def ours(cfg, params, x_nchw, keep_ids=None):
  out = ViT(cfg).apply({"params": params}, x_nchw.transpose(0, 2, 3, 1), keep_ids=keep_ids)
  return np.asarray(out["tokens"])


def hf_kwargs(size, eps=1e-6, image_size=32):
  w, d, h, m, p = SIZES[size]
  return dict(hidden_size=w, num_hidden_layers=d, num_attention_heads=h, intermediate_size=m, patch_size=p,
              image_size=image_size, layer_norm_eps=eps, hidden_act="gelu")


def our_cfg(size, image_size, **kw):
  w, d, h, m, p = SIZES[size]
  return ViTConfig(width=w, depth=d, heads=h, mlp_dim=m, patch=p, image_size=image_size, **kw)


def hf_vit(size, seed=0, **kw):
  return perturb(transformers.ViTModel(transformers.ViTConfig(**hf_kwargs(size, **kw))), seed)


def hf_dinov2(size, seed=0):
  w, d, h, _, p = SIZES[size]
  cfg = transformers.Dinov2Config(hidden_size=w, num_hidden_layers=d, num_attention_heads=h, mlp_ratio=2,
                                  patch_size=p, image_size=32, layer_norm_eps=1e-6, hidden_act="gelu")
  return perturb(transformers.Dinov2Model(cfg), seed)


# ---------------------------------------------------------------------------------------------
# Renaming written in the test, independently of the library
# ---------------------------------------------------------------------------------------------

def timm_block(sd, src, dst, dinov2=False):
  """One HF (transformers 5) layer `src` -> timm/MAE-official names under `dst` (fused qkv)."""
  n1, n2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
  a = src + "attention."
  out = {dst + "norm1.weight": sd[src + n1 + ".weight"], dst + "norm1.bias": sd[src + n1 + ".bias"],
         dst + "norm2.weight": sd[src + n2 + ".weight"], dst + "norm2.bias": sd[src + n2 + ".bias"],
         dst + "attn.qkv.weight": torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"], 0),
         dst + "attn.qkv.bias": torch.cat([sd[a + f"{n}_proj.bias"] for n in "qkv"], 0),
         dst + "attn.proj.weight": sd[a + "o_proj.weight"], dst + "attn.proj.bias": sd[a + "o_proj.bias"]}
  for fc in ("fc1", "fc2"):
    for leaf in ("weight", "bias"):
      out[f"{dst}mlp.{fc}.{leaf}"] = sd[f"{src}mlp.{fc}.{leaf}"]
  if dinov2:
    out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
    out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
  return out


def hf_to_timm(sd, depth, prefix="", layers="layers.", dinov2=False):
  p = prefix
  out = {"cls_token": sd[p + "embeddings.cls_token"], "pos_embed": sd[p + "embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd[p + "embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd[p + "embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd[p + "layernorm.weight"], "norm.bias": sd[p + "layernorm.bias"]}
  for i in range(depth):
    out.update(timm_block(sd, f"{p}{layers}{i}.", f"blocks.{i}.", dinov2))
  return out


def hf_to_big_vision(sd, depth, heads, scanned=False):
  """HF ViTModel -> AugReg npz names (or big_vision's scanned layout with a leading depth axis)."""
  n = lambda t: t.detach().numpy()
  d = sd["embeddings.cls_token"].shape[-1]
  out = {"embedding/kernel": n(sd["embeddings.patch_embeddings.projection.weight"]).transpose(2, 3, 1, 0),
         "embedding/bias": n(sd["embeddings.patch_embeddings.projection.bias"]),
         "cls": n(sd["embeddings.cls_token"]),
         "Transformer/encoder_norm/scale": n(sd["layernorm.weight"]),
         "Transformer/encoder_norm/bias": n(sd["layernorm.bias"]),
         "head/kernel": np.zeros((d, 5), np.float32), "head/bias": np.zeros(5, np.float32)}
  out["pos_embedding" if scanned else "Transformer/posembed_input/pos_embedding"] = n(
      sd["embeddings.position_embeddings"])
  ln1, mha, ln2, mlp = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if scanned \
      else ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
  blocks = []
  for i in range(depth):
    s, b = f"layers.{i}.", {}
    b[f"{ln1}/scale"], b[f"{ln1}/bias"] = n(sd[s + "layernorm_before.weight"]), n(sd[s + "layernorm_before.bias"])
    b[f"{ln2}/scale"], b[f"{ln2}/bias"] = n(sd[s + "layernorm_after.weight"]), n(sd[s + "layernorm_after.bias"])
    for ours_name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
      b[f"{mha}/{ours_name}/kernel"] = n(sd[f"{s}attention.{hf}_proj.weight"]).T.reshape(d, heads, d // heads)
      b[f"{mha}/{ours_name}/bias"] = n(sd[f"{s}attention.{hf}_proj.bias"]).reshape(heads, d // heads)
    b[f"{mha}/out/kernel"] = n(sd[s + "attention.o_proj.weight"]).T.reshape(heads, d // heads, d)
    b[f"{mha}/out/bias"] = n(sd[s + "attention.o_proj.bias"])
    for j, fc in enumerate(("fc1", "fc2")):
      b[f"{mlp}/Dense_{j}/kernel"] = n(sd[f"{s}mlp.{fc}.weight"]).T
      b[f"{mlp}/Dense_{j}/bias"] = n(sd[f"{s}mlp.{fc}.bias"])
    blocks.append(b)
  if scanned:
    out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
  else:
    out.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
  return out


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src,dst", [((4, 4), (6, 6)), ((6, 6), (4, 4)), ((14, 14), (37, 37)), ((37, 37), (16, 16)),
                                     ((3, 5), (11, 2)), ((5, 5), (5, 5))])
def test_bicubic_resize_matches_torch_interpolate(src, dst):
  x = np.random.RandomState(0).randn(*src, 7).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=dst, mode="bicubic",
                                        align_corners=False)[0].permute(1, 2, 0).numpy()
  assert report(f"bicubic {src}->{dst} vs F.interpolate", np.abs(cv.bicubic_resize(x, dst) - ref).max()) <= 1e-5


def test_resample_pos_embed_keeps_cls_and_adds_missing_cls():
  pos = np.random.RandomState(1).randn(1, 17, 8).astype(np.float32)
  out = cv.resample_pos_embed(pos, 6)
  assert out.shape == (1, 37, 8)
  np.testing.assert_array_equal(out[:, :1], pos[:, :1])
  no_cls = cv.resample_pos_embed(pos[:, 1:], 6)  # timm no_embed_class: cls position becomes 0
  np.testing.assert_array_equal(no_cls[:, 0], 0.0)
  np.testing.assert_allclose(no_cls[:, 1:], out[:, 1:])


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("image_size", [32, 48, 24])
def test_hf_vit_matches(size, image_size):
  if image_size % SIZES[size][4]:
    pytest.skip("image size not a multiple of the patch")
  model = hf_vit(size)
  cfg = our_cfg(size, image_size)
  sd = model.state_dict()
  assert cv.detect_format(sd) == "hf_vit"
  enc, dec = cv.convert(sd, cfg)
  assert dec is None
  x = images(image_size)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), interpolate_pos_encoding=True).last_hidden_state.numpy()
  diff = np.abs(ours(cfg, enc, x) - ref).max()
  assert report(f"HF ViTModel {size} 32->{image_size}px last_hidden_state", diff) <= TOL


def test_hf_vit_transformers4_names_give_the_same_tree():
  """Old hub checkpoints: vit. prefix, encoder.layer.N, attention.attention.query, intermediate/output.dense."""
  sd = hf_vit("w64d2").state_dict()
  old = {}
  for k, v in sd.items():
    k2 = k.replace("layers.", "encoder.layer.").replace("attention.q_proj", "attention.attention.query")
    k2 = k2.replace("attention.k_proj", "attention.attention.key")
    k2 = k2.replace("attention.v_proj", "attention.attention.value")
    k2 = k2.replace("attention.o_proj", "attention.output.dense").replace("mlp.fc1", "intermediate.dense")
    k2 = k2.replace("mlp.fc2", "output.dense")
    old["vit." + k2] = v
  old["classifier.weight"] = torch.zeros(3, 64)
  cfg = our_cfg("w64d2", 32)
  new_tree, _ = cv.convert(sd, cfg)
  old_tree, _ = cv.convert(old, cfg, fmt="hf_vit")
  flat_new, flat_old = tree_lib.flatten(new_tree), tree_lib.flatten(old_tree)
  assert flat_new.keys() == flat_old.keys()
  for k in flat_new:
    np.testing.assert_array_equal(flat_new[k], flat_old[k])


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("image_size", [32, 48])
def test_hf_vit_mae_encoder_matches(size, image_size):
  p = SIZES[size][4]
  hcfg = transformers.ViTMAEConfig(**hf_kwargs(size, eps=1e-12), mask_ratio=0.75)
  model = perturb(transformers.ViTMAEModel(hcfg), 1)
  cfg = our_cfg(size, image_size, ln_eps=1e-12, pos_emb="sincos")
  enc, _ = cv.convert(model.state_dict(), cfg)
  x = images(image_size)
  n = (image_size // p) ** 2
  noise = np.random.RandomState(2).rand(2, n).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), noise=torch.from_numpy(noise), interpolate_pos_encoding=True).last_hidden_state
  keep_ids, _, _ = random_masking(noise, 0.75)
  diff = np.abs(ours(cfg, enc, x, keep_ids=keep_ids) - ref.numpy()).max()
  assert report(f"HF ViTMAEModel {size} 32->{image_size}px visible tokens", diff) <= TOL


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("image_size", [32, 48])
def test_hf_dinov2_matches(size, image_size):
  model = hf_dinov2(size)
  sd = model.state_dict()
  assert cv.detect_format(sd) == "hf_dinov2"
  cfg = ViTConfig(width=SIZES[size][0], depth=SIZES[size][1], heads=SIZES[size][2], mlp_dim=2 * SIZES[size][0],
                  patch=SIZES[size][4], image_size=image_size, layer_scale=True)
  enc, _ = cv.convert(sd, cfg)
  x = images(image_size)
  with torch.no_grad():
    ref = model(torch.from_numpy(x)).last_hidden_state.numpy()
  diff = np.abs(ours(cfg, enc, x) - ref).max()
  assert report(f"HF Dinov2Model {size} 32->{image_size}px last_hidden_state", diff) <= TOL


@pytest.mark.parametrize("source", ["vit", "dinov2"])
def test_timm_named_pth(tmp_path, source):
  """MAE / DINO-style .pth with timm names (fused qkv), wrappers, prefixes and heads to drop."""
  size, image_size = "w64d2", 48
  model = hf_vit(size, seed=3) if source == "vit" else hf_dinov2(size, seed=3)
  sd = model.state_dict()
  timm_sd = hf_to_timm(sd, SIZES[size][1], layers="layers." if source == "vit" else "encoder.layer.",
                       dinov2=source == "dinov2")
  path = tmp_path / "ckpt.pth"
  if source == "vit":  # MAE fine-tune style: {'model': ...} saved from DDP, with a classifier head
    timm_sd["head.weight"], timm_sd["head.bias"] = torch.zeros(10, 64), torch.zeros(10)
    torch.save({"model": {"module." + k: v.clone() for k, v in timm_sd.items()}, "epoch": 3}, path)
  else:  # DINO training checkpoint: teacher/student, 'backbone.' prefix, a DINO head, DINOv2's mask token
    teacher = {"backbone." + k: v.clone() for k, v in timm_sd.items()}
    teacher.update({"backbone.mask_token": torch.zeros(1, 64), "head.mlp.0.weight": torch.zeros(8, 64)})
    torch.save({"student": {"backbone.norm.weight": torch.zeros(64)}, "teacher": teacher, "epoch": 3}, path)
  loaded = cv.load_state_dict(path)
  assert cv.detect_format(loaded) == "timm"
  cfg = ViTConfig(width=64, depth=2, heads=4, mlp_dim=128, patch=8, image_size=image_size,
                  layer_scale=source == "dinov2")
  enc, dec = cv.load_pretrained(path, cfg)
  assert dec is None
  x = images(image_size, seed=4)
  with torch.no_grad():
    kw = {"interpolate_pos_encoding": True} if source == "vit" else {}
    ref = model(torch.from_numpy(x), **kw).last_hidden_state.numpy()
  diff = np.abs(ours(cfg, enc, x) - ref).max()
  assert report(f"timm-named .pth ({source}) 32->{image_size}px", diff) <= TOL


def test_safetensors_round_trip(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  model = hf_vit("w48d3", seed=5)
  path = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  cfg = our_cfg("w48d3", 32)
  enc, _ = cv.load_pretrained(path, cfg)
  x = images(32, seed=6)
  with torch.no_grad():
    ref = model(torch.from_numpy(x)).last_hidden_state.numpy()
  diff = np.abs(ours(cfg, enc, x) - ref).max()
  assert report("safetensors HF ViT w48d3 32px", diff) <= TOL


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_npz(tmp_path, scanned):
  size, image_size = "w64d2", 48
  model = hf_vit(size, seed=7)
  path = tmp_path / "augreg.npz"
  np.savez(path, **hf_to_big_vision(model.state_dict(), SIZES[size][1], SIZES[size][2], scanned=scanned))
  loaded = cv.load_state_dict(path)
  assert cv.detect_format(loaded) == "big_vision"
  cfg = our_cfg(size, image_size)
  enc, _ = cv.load_pretrained(path, cfg)
  x = images(image_size, seed=8)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), interpolate_pos_encoding=True).last_hidden_state.numpy()
  diff = np.abs(ours(cfg, enc, x) - ref).max()
  assert report(f"big_vision npz ({'scanned' if scanned else 'AugReg'}) 32->{image_size}px", diff) <= TOL


def test_mae_official_names_with_decoder(tmp_path):
  """HF ViTMAEForPreTraining -> mae_visualize_* names -> library -> same decoder logits."""
  hcfg = transformers.ViTMAEConfig(**hf_kwargs("w64d2", eps=1e-6), mask_ratio=0.75, decoder_hidden_size=32,
                                   decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                                   decoder_intermediate_size=64)
  model = perturb(transformers.ViTMAEForPreTraining(hcfg), 9)
  sd = model.state_dict()
  off = hf_to_timm(sd, 2, prefix="vit.")
  off.update({"decoder_embed.weight": sd["decoder.decoder_embed.weight"],
              "decoder_embed.bias": sd["decoder.decoder_embed.bias"], "mask_token": sd["decoder.mask_token"],
              "decoder_pos_embed": sd["decoder.decoder_pos_embed"],
              "decoder_norm.weight": sd["decoder.decoder_norm.weight"],
              "decoder_norm.bias": sd["decoder.decoder_norm.bias"],
              "decoder_pred.weight": sd["decoder.decoder_pred.weight"],
              "decoder_pred.bias": sd["decoder.decoder_pred.bias"]})
  for i in range(2):
    off.update(timm_block(sd, f"decoder.decoder_layers.{i}.", f"decoder_blocks.{i}."))
  path = tmp_path / "mae_visualize_vit_tiny.pth"
  torch.save({"model": {k: v.clone() for k, v in off.items()}}, path)

  cfg = our_cfg("w64d2", 32, pos_emb="sincos")
  enc, none = cv.load_pretrained(path, cfg)  # decoder not wanted: ignored, no error
  assert none is None
  enc, dec = cv.load_pretrained(path, cfg, want_decoder=True)
  dcfg = cv.infer_decoder_config(dec, heads=2, ln_eps=1e-6)
  assert (dcfg.width, dcfg.depth, dcfg.mlp_dim) == (32, 2, 64)
  x = images(32, seed=10)
  noise = np.random.RandomState(11).rand(2, 16).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), noise=torch.from_numpy(noise)).logits.numpy()
  keep_ids, _, ids_restore = random_masking(noise, 0.75)
  out = ViT(cfg).apply({"params": enc}, x.transpose(0, 2, 3, 1), keep_ids=keep_ids)
  logits = MAEDecoder(dcfg, cfg).apply({"params": dec}, out["tokens"], ids_restore)
  diff = np.abs(np.asarray(logits) - ref).max()
  assert report("MAE-official names (.pth) decoder logits", diff) <= TOL


def test_want_decoder_without_decoder_raises():
  with pytest.raises(ValueError, match="no MAE decoder"):
    cv.convert(hf_vit("w64d2").state_dict(), our_cfg("w64d2", 32), want_decoder=True)


def test_fc_norm_maps_to_norm_only_without_norm():
  sd = {k: v.numpy() for k, v in hf_to_timm(hf_vit("w64d2").state_dict(), 2).items()}
  cfg = our_cfg("w64d2", 32)
  fc = dict(sd)
  fc["fc_norm.weight"], fc["fc_norm.bias"] = fc.pop("norm.weight") + 1, fc.pop("norm.bias") + 1
  enc, _ = cv.convert(fc, cfg)
  np.testing.assert_array_equal(enc["norm"]["scale"], fc["fc_norm.weight"])
  both = dict(sd, **{"fc_norm.weight": sd["norm.weight"] + 1, "fc_norm.bias": sd["norm.bias"] + 1})
  enc, _ = cv.convert(both, cfg)
  np.testing.assert_array_equal(enc["norm"]["scale"], sd["norm.weight"])


@pytest.mark.parametrize("model_depth", [1, 3])
def test_mismatched_checkpoint_raises_one_error(model_depth):
  sd = hf_vit("w64d2").state_dict()  # width 64, depth 2
  cfg = ViTConfig(width=48, depth=model_depth, heads=4, mlp_dim=128, patch=8, image_size=32)
  with pytest.raises(ValueError) as err:
    cv.convert(sd, cfg)
  msg = str(err.value)
  print("\n" + msg)
  assert "shape mismatches" in msg
  assert "embeddings.cls_token -> encoder cls: checkpoint (1, 1, 64) vs model (1, 1, 48)" in msg
  if model_depth == 1:
    assert "unexpected in the checkpoint" in msg and "layers.1.mlp.fc1.weight" in msg
  else:
    assert "missing in the checkpoint" in msg and "encoder blocks_2/attn/q/kernel" in msg
  assert "model.width=64" in msg and "model.depth=2" in msg


def test_mismatch_suggests_variant():
  model = transformers.ViTModel(transformers.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                                       intermediate_size=256, patch_size=8, image_size=32))
  with pytest.raises(ValueError, match=r"model.variant='Mu/8'"):
    cv.convert(model.state_dict(), ViTConfig.from_variant("Ti/16", image_size=32))


def test_unknown_keys_are_unexpected_and_format_detection():
  sd = {k: v.numpy() for k, v in hf_to_timm(hf_vit("w64d2").state_dict(), 2).items()}
  sd["blocks.0.attn.q_norm.weight"] = np.ones(16, np.float32)
  with pytest.raises(ValueError, match=r"unexpected in the checkpoint \(1\):\n    blocks.0.attn.q_norm.weight"):
    cv.convert(sd, our_cfg("w64d2", 32))
  assert cv.detect_format({"decoder.decoder_embed.weight": 0, "vit.embeddings.patch_embeddings.projection.weight": 0}) \
      == "hf_vit_mae"
  with pytest.raises(ValueError, match="init.format"):
    cv.detect_format({"foo.weight": np.zeros(1)})


def test_missing_file_names_path_and_field(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.pth.*init\.path"):
    cv.load_pretrained(tmp_path / "nope.pth", ViTConfig())


# -- a .pth whose pickle asks to run code: refused by name, never run -----------------------------------------------

class _RunsCode:
  """Unpickled with plain pickle, this calls func(arg): the payload of a malicious checkpoint. Only ever saved here."""

  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


def _malicious_pth(path, func, marker):
  """A .pth with a real state dict and a payload that would create `marker` if it ran."""
  arg = f"touch {marker}" if func is os.system else f"__import__('pathlib').Path({str(marker)!r}).touch()"
  torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "args": _RunsCode(func, arg)}, path)
  return path


def _refused(path, name):
  return (f"init.path {path} refused: the file asks to run code (pickle global {name}); only plain tensors are "
          "loaded. Save just the state dict (torch.save(model.state_dict(), ...)) or convert it to .safetensors.")


@pytest.mark.parametrize("func", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_pickle_payload_is_refused_not_run(tmp_path, func):
  marker = tmp_path / "ran"
  path = _malicious_pth(tmp_path / "evil.pth", func, marker)
  name = f"{os.system.__module__}.system" if func is os.system else "builtins.eval"  # posix.system on Linux
  with pytest.raises(ValueError) as e:
    cv.load_state_dict(path)
  assert str(e.value) == _refused(path, name), e.value
  assert "weights_only" not in str(e.value) and "truncated or corrupt" not in str(e.value)
  assert not marker.exists()


def test_pickle_payload_is_refused_through_the_cli(tmp_path):
  marker = tmp_path / "ran"
  path = _malicious_pth(tmp_path / "evil.pth", os.system, marker)
  r = run_cli(["--config", "configs/experiment.py:demo,smoke", f"--config.init.path={path}",
               "--workdir", str(tmp_path / "run")], timeout=180)
  msg = one_error_line(r)
  assert _refused(path, f"{os.system.__module__}.system") in msg, msg
  assert "weights_only" not in r.stdout + r.stderr
  assert not marker.exists()
