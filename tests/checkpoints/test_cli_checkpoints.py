"""Every pre-trained checkpoint format through the CLI entry (main.run, and `python -m tpp_jax.main` once).

The checkpoints are written here from tiny random PyTorch models: HF ViTModel / ViTMAEForPreTraining /
Dinov2Model (`save_pretrained`), MAE- and DINO-style `.pth` with timm names, a big_vision `.npz`. Each runs
2 steps of `finetune` and of `tpp` (MAE); the frozen backbone restored from the run's own checkpoint must give
transformers' `last_hidden_state` (max abs diff <= 1e-4). Run with -s to see the differences.
"""
import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import hf_to_big_vision, hf_to_timm, perturb  # noqa: E402  (renaming written independently)

from tpp_jax import build as build_lib
from tpp_jax import config as config_lib  # noqa: E402
from tpp_jax import main, pipeline
from tpp_jax.checkpoints import load as load_lib  # noqa: E402
from tpp_jax.models.mae import MAEDecoder, MAEDecoderConfig, random_masking  # noqa: E402
from tpp_jax.models.vit import ViT, ViTConfig  # noqa: E402
from tpp_jax.objectives import make_objective  # noqa: E402

from conftest import load_config, run_cli  # noqa: E402

TOL = 1e-4
W, D, H, M, P, S = 64, 2, 2, 256, 8, 32  # width, depth, heads, mlp, patch, image size: model.variant=Mu/8, depth 2
DEC = dict(decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
           decoder_intermediate_size=64)  # = the smoke preset's pretext.decoder_*
NO_DECODER = "checkpoint has no MAE decoder; training a new one from random init"
BASE_ARG = "demo,smoke,px32,steps=2,log_every=1,checkpoint_every=0,eval_splits=(),batch_size=8"
# model.* per checkpoint kind: HF ViT(MAE) eps 1e-12, the rest 1e-6; supervised / DINO ViTs: learned pos + cls
MODEL = f"model.variant=Mu/{P},model.depth={D}"
KINDS = {
    "vit": f"{MODEL},model.pos_emb=learned,model.pooling=cls,model.ln_eps=1e-12",
    "vit6": f"{MODEL},model.pos_emb=learned,model.pooling=cls",
    "mae": f"{MODEL},model.ln_eps=1e-12",
    "mae6": MODEL,
    "dinov2": f"{MODEL},model.pos_emb=learned,model.pooling=cls,model.layer_scale=True",
}


def report(name, diff):
  print(f"\nMAXDIFF {name}: {diff:.3g}")
  return diff


def hf_args(eps):
  return dict(hidden_size=W, num_hidden_layers=D, num_attention_heads=H, intermediate_size=M, patch_size=P,
              image_size=S, layer_norm_eps=eps, hidden_act="gelu")


# -- checkpoint writers: (init.path, the torch model to compare with, model kind) ----------------------

def _hf_vit(d):
  m = perturb(transformers.ViTModel(transformers.ViTConfig(**hf_args(1e-12)), add_pooling_layer=False), 1)
  m.save_pretrained(d / "hf_vit")
  return d / "hf_vit", m, "vit"  # the save_pretrained folder


def _hf_vit_mae(d):
  m = perturb(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**hf_args(1e-12), **DEC)), 2)
  m.save_pretrained(d / "hf_vit_mae")
  return d / "hf_vit_mae" / "model.safetensors", m, "mae"  # the weights file itself


def _hf_dinov2(d):
  cfg = transformers.Dinov2Config(hidden_size=W, num_hidden_layers=D, num_attention_heads=H, mlp_ratio=M // W,
                                  patch_size=P, image_size=S, layer_norm_eps=1e-6, hidden_act="gelu")
  m = perturb(transformers.Dinov2Model(cfg), 3)
  m.save_pretrained(d / "hf_dinov2")
  return d / "hf_dinov2", m, "dinov2"


def _mae_pth(d):
  """MAE official encoder-only `mae_pretrain_*.pth`: {'model': timm names}, no decoder."""
  m = perturb(transformers.ViTMAEModel(transformers.ViTMAEConfig(**hf_args(1e-6))), 4)
  path = d / "mae_pretrain_vit_tiny.pth"
  torch.save({"model": {k: v.clone() for k, v in hf_to_timm(m.state_dict(), D).items()}}, path)
  return path, m, "mae6"


def _dino_pth(d):
  """DINO release `dino_*_pretrain.pth`: a bare timm-named state dict."""
  m = perturb(transformers.ViTModel(transformers.ViTConfig(**hf_args(1e-6)), add_pooling_layer=False), 5)
  path = d / "dino_vittiny8_pretrain.pth"
  torch.save({k: v.clone() for k, v in hf_to_timm(m.state_dict(), D).items()}, path)
  return path, m, "vit6"


def _big_vision(d):
  m = perturb(transformers.ViTModel(transformers.ViTConfig(**hf_args(1e-6)), add_pooling_layer=False), 6)
  path = d / "augreg_tiny.npz"
  np.savez(path, **hf_to_big_vision(m.state_dict(), D, H))
  return path, m, "vit6"


WRITERS = {"hf_vit": _hf_vit, "hf_vit_mae": _hf_vit_mae, "hf_dinov2": _hf_dinov2, "mae_pth": _mae_pth,
           "dino_pth": _dino_pth, "big_vision": _big_vision}


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """Tiny models and 2 steps: XLA's optimisation passes cost more than they save here (the checks compare weights).

  JAX's in-memory compilation cache does not key on this flag: a program compiled here would serve every later test
  in this process that compiles the same program, unoptimised (a 6-step demo run after this module ended with an eval
  loss 9e-10 off, seen in tests/test_workdir.py under pytest-xdist). So the caches are cleared on the way in and on
  the way out."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
  jax.clear_caches()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpts")
  return {name: write(d) for name, write in WRITERS.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A tiny grey 32 px two-class npz (train 16, val 8, test 8)."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  arrays = {}
  for split, n in (("train", 16), ("val", 8), ("test", 8)):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, S, S), dtype=np.uint8)
    arrays[f"{split}_labels"] = np.arange(n) % 2
  np.savez(path, **arrays)
  return path


def _config(ckpt, data, arg=""):
  path, _, kind = ckpt
  c = load_config("experiment", ",".join(a for a in (BASE_ARG, KINDS[kind], arg) if a))
  c.init.path, c.data.path = str(path), str(data)
  return c


# -- what the run loaded vs transformers ---------------------------------------------------------------

def _restored_params(workdir):
  mngr = ocp.CheckpointManager(workdir / "checkpoints")
  r = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return jax.tree_util.tree_map(np.asarray, r["state"]["params"])


def _backbone(enc, cfg):
  """The plain-ViT leaves of a (PEFT) encoder tree: the frozen backbone."""
  tmpl = jax.eval_shape(ViT(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, S, S, 3), np.float32))
  pick = lambda t, e: {k: pick(v, e[k]) if isinstance(v, dict) else np.asarray(e[k]) for k, v in t.items()}
  return pick(tmpl["params"], enc)


def _diff_vs_torch(ckpt, config, workdir, seed=0):
  _, model, kind = ckpt
  cfg = ViTConfig.from_config(config.model)
  enc = _backbone(_restored_params(workdir)["encoder"], cfg)
  rs = np.random.RandomState(seed)
  x = rs.randn(2, 3, S, S).astype(np.float32)
  keep = None
  with torch.no_grad():
    if kind.startswith("mae"):  # ViTMAE encodes the visible patches: same noise on both sides
      noise = rs.rand(2, (S // P) ** 2).astype(np.float32)
      vit = model.vit if hasattr(model, "vit") else model
      ref = vit(torch.from_numpy(x), noise=torch.from_numpy(noise)).last_hidden_state.numpy()
      keep = random_masking(noise, vit.config.mask_ratio)[0]
    else:
      ref = model(torch.from_numpy(x)).last_hidden_state.numpy()
  out = ViT(cfg).apply({"params": enc}, x.transpose(0, 2, 3, 1), keep_ids=keep)["tokens"]
  return float(np.abs(np.asarray(out) - ref).max())


def _decoder_diff_vs_torch(model, config, workdir, decoder):
  """The MAE decoder the run started from vs ViTMAEForPreTraining's logits (same noise)."""
  cfg = ViTConfig.from_config(config.model)
  enc = _backbone(_restored_params(workdir)["encoder"], cfg)
  rs = np.random.RandomState(1)
  x, noise = rs.rand(2, 3, S, S).astype(np.float32), rs.rand(2, (S // P) ** 2).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), noise=torch.from_numpy(noise)).logits.numpy()
  keep, _, restore = random_masking(noise, model.config.mask_ratio)
  tokens = ViT(cfg).apply({"params": enc}, x.transpose(0, 2, 3, 1), keep_ids=keep)["tokens"]
  p = config.pretext
  dcfg = MAEDecoderConfig(p.decoder_width, p.decoder_depth, p.decoder_heads, p.decoder_mlp_dim, cfg.ln_eps)
  return float(np.abs(np.asarray(MAEDecoder(dcfg, cfg).apply({"params": decoder}, tokens, restore)) - ref).max())


# -- tests -----------------------------------------------------------------------------------------------

# (hf_vit, finetune) runs as `python -m tpp_jax.main` in test_cli_subprocess_hf_folder_finetune
@pytest.mark.parametrize("fmt,stage", [(f, s) for f in sorted(WRITERS) for s in ("finetune", "tpp")
                                       if (f, s) != ("hf_vit", "finetune")])
def test_format_trains_and_loads_the_torch_weights(ckpts, data, tmp_path, capsys, monkeypatch, fmt, stage):
  got = {}
  orig = load_lib.init_decoder

  def spy(*a):  # the decoder the run starts from (it trains, so the checkpoint holds a different one)
    extra, source = orig(*a)
    got["decoder"] = jax.tree_util.tree_map(np.asarray, extra.get("decoder"))
    return extra, source
  monkeypatch.setattr(load_lib, "init_decoder", spy)
  c = _config(ckpts[fmt], data, f"stage={stage}")
  summary = main.run(c, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert summary["steps"] == 2 and summary["stage"] == stage
  has_decoder = fmt == "hf_vit_mae"
  assert summary["init"].endswith("(+ MAE decoder)") == (stage == "tpp" and has_decoder), summary["init"]
  assert out.count(NO_DECODER) == (1 if stage == "tpp" and not has_decoder else 0), out
  diff = _diff_vs_torch(ckpts[fmt], c, tmp_path / "run")
  with capsys.disabled():
    assert report(f"{fmt} {stage} (init: {summary['init'].split(' ')[0]}) last_hidden_state", diff) <= TOL
    if stage == "tpp" and has_decoder:
      diff = _decoder_diff_vs_torch(ckpts[fmt][1], c, tmp_path / "run", got["decoder"])
      assert report(f"{fmt} {stage} loaded MAE decoder logits", diff) <= TOL


def test_dino_pretext_from_a_decoderless_checkpoint(ckpts, data, tmp_path, capsys):
  c = _config(ckpts["hf_vit"], data, "stage=tpp,pretext.type=dino")
  summary = main.run(c, str(tmp_path / "run"))
  assert NO_DECODER not in capsys.readouterr().out  # DINO never wants a decoder
  assert "dino_head" in _restored_params(tmp_path / "run") and summary["init"].startswith("hf_vit checkpoint")
  with capsys.disabled():
    assert report("hf_vit tpp pretext=dino", _diff_vs_torch(ckpts["hf_vit"], c, tmp_path / "run")) <= TOL


def test_load_decoder_false_trains_a_new_decoder(ckpts, data, tmp_path, capsys):
  """A 2-block decoder does not fit the checkpoint's 1-block one: an error, unless init.load_decoder=False."""
  bad = _config(ckpts["hf_vit_mae"], data, "stage=tpp,pretext.decoder_depth=2")
  with pytest.raises(config_lib.ConfigError, match=r"1 block\(s\) of width 32.*init\.load_decoder=False"):
    main.run(bad, str(tmp_path / "bad"))
  c = _config(ckpts["hf_vit_mae"], data, "stage=tpp,pretext.decoder_depth=2,init.load_decoder=False")
  summary = main.run(c, str(tmp_path / "run"))
  assert "MAE decoder" not in summary["init"] and NO_DECODER not in capsys.readouterr().out
  assert "blocks_1" in _restored_params(tmp_path / "run")["decoder"]
  with capsys.disabled():
    assert report("hf_vit_mae tpp load_decoder=False", _diff_vs_torch(ckpts["hf_vit_mae"], c, tmp_path / "run")) \
        <= TOL


@pytest.mark.parametrize("stage", ["finetune", "linear", "full", "tpp", "pretrain", "pipeline"])
def test_every_stage_initialises_from_a_decoderless_checkpoint(ckpts, data, tmp_path, capsys, stage):
  """No stage asks for a decoder; pipeline's arms (tpp, finetune) included. Init only, nothing compiled."""
  c = _config(ckpts["mae_pth"], data, f"stage={stage}")
  configs = pipeline.arm_configs(c, 0, tmp_path).values() if stage == "pipeline" else [c]
  batch = {"image": np.zeros((2, S, S, 3), np.float32), "label": np.zeros(2, np.int32)}
  for cfg in configs:
    encoder = build_lib.build_encoder(cfg)
    params, _, source = build_lib.init_params(cfg, encoder, make_objective(cfg, encoder), batch, jax.random.key(0))
    assert source.startswith("timm checkpoint") and "MAE decoder" not in source
    assert ("decoder" in params) == (cfg.stage in ("tpp", "pretrain"))
  assert capsys.readouterr().out.count(NO_DECODER) == (1 if stage in ("tpp", "pretrain", "pipeline") else 0)


def test_hf_config_json_catches_what_the_weights_do_not_store(ckpts, data, tmp_path):
  """Heads and LayerNorm eps are not in the weights: config.json beside them is checked, with the fix."""
  with pytest.raises(config_lib.ConfigError, match=r"layer_norm_eps=1e-12 \(model.ln_eps=1e-06\).*"
                                                   r"--config\.model\.ln_eps=1e-12"):
    main.run(_config(ckpts["hf_vit"], data, "model.ln_eps=1e-6"), str(tmp_path / "a"))
  folder = tmp_path / "hf_vit_4heads"
  shutil.copytree(ckpts["hf_vit"][0], folder)
  hf = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**hf, "num_attention_heads": 4}))
  c = _config(ckpts["hf_vit"], data)
  c.init.path = str(folder)
  with pytest.raises(config_lib.ConfigError, match=r"num_attention_heads=4 \(model.heads=2\)"):
    main.run(c, str(tmp_path / "b"))


def test_sharded_hf_folder_and_a_folder_without_weights(ckpts, data, tmp_path):
  model = ckpts["hf_vit"][1]
  model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  c = _config(ckpts["hf_vit"], data)
  encoder = build_lib.build_encoder(c)
  whole, _, _ = load_lib.load_backbone(c, encoder)
  c.init.path = str(tmp_path / "sharded")
  sharded, _, source = load_lib.load_backbone(c, encoder)
  assert source.startswith("hf_vit checkpoint") and source.endswith("model.safetensors.index.json")
  jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, whole)
  (tmp_path / "empty").mkdir()
  c.init.path = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"neither Hugging Face weights \(model\.safetensors"):
    main.run(c, str(tmp_path / "run"))


def test_cli_subprocess_hf_folder_finetune(ckpts, data, tmp_path, monkeypatch):
  """`python -m tpp_jax.main` with a save_pretrained folder (the README's Hugging Face command shape)."""
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
  path, _, kind = ckpts["hf_vit"]
  wd = tmp_path / "run"
  r = run_cli(["--config", f"configs/experiment.py:{BASE_ARG},{KINDS[kind]}", "--workdir", str(wd),
               f"--config.init.path={path}", f"--config.data.path={data}"], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"[finetune] hf_vit checkpoint {path}/model.safetensors" in r.stdout, r.stdout[-2000:]
  c = _config(ckpts["hf_vit"], data)
  assert json.loads((wd / "summary.json").read_text())["steps"] == 2
  assert report("hf_vit finetune via python -m tpp_jax.main", _diff_vs_torch(ckpts["hf_vit"], c, wd)) <= TOL
