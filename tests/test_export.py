"""tpp_jax.export: adapter / peft / merged exports of tiny trained runs, checked against PyTorch.

The runs fine-tune LoRA, DoRA + rsLoRA and SSF for 3 steps on a tiny Hugging Face ViTModel the test saves
(width 32, depth 2, 32 px, patch 8) with the shipped demo data. Run with -s to see the max abs differences.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tpp_jax import engine, export  # noqa: E402  pylint: disable=wrong-import-position
from tpp_jax import main as tpp_main  # noqa: E402  pylint: disable=wrong-import-position
from tpp_jax.checkpoints import restore  # noqa: E402  pylint: disable=wrong-import-position
from tpp_jax.checkpoints.hf_export import flatten  # noqa: E402  pylint: disable=wrong-import-position
from tpp_jax.config import ConfigError, base_config  # noqa: E402  pylint: disable=wrong-import-position

from conftest import ROOT  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WIDTH, DEPTH, HEADS, MLP, PATCH, SIZE, TOL = 32, 2, 2, 64, 8, 32, 1e-4
DEMO = ROOT / "tpp_jax" / "assets" / "demo_cxr_64" / "demo_cxr_64.npz"
README_SECTION = "Use a trained model: export"
# The README's PyTorch snippet, run as written with the paths and the image size substituted.
SNIPPET = """\
import torch, transformers, peft
base = transformers.ViTModel.from_pretrained("hf_vit")                        # the run's init.path folder
model = peft.PeftModel.from_pretrained(base, "exports/hf_b16_peft").eval()    # OUT of --format peft
images = torch.randn(2, 3, 224, 224)  # NCHW, normalised with the run's data.mean / data.std
tokens = model(pixel_values=images).last_hidden_state  # = tpp_jax's encoder(images)["tokens"]
"""

def report(name, diff):
  print(f"\nMAXDIFF {name}: {diff:.3g}")
  return diff


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  """A tiny transformers ViTModel (with pooler) saved with save_pretrained; weights perturbed off their init."""
  torch.manual_seed(0)
  cfg = transformers.ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                               intermediate_size=MLP, patch_size=PATCH, image_size=SIZE, layer_norm_eps=1e-6)
  model = transformers.ViTModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  folder = tmp_path_factory.mktemp("hf") / "vit_base"
  model.save_pretrained(folder)
  return folder


def make_config(init_path, **peft_kw):
  c = base_config()
  c.stage = "finetune"
  c.model.update(variant="Mu/8", width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP, image_size=SIZE, ln_eps=1e-6,
                 pooling="cls")
  c.data.update(source="npz", path=str(DEMO), image_size=SIZE, channels=3, max_train_examples=32,
                max_eval_examples=32)
  c.init.path = str(init_path)
  c.peft.update(rank=4, alpha=8.0, **peft_kw)
  c.update(steps=3, batch_size=8, eval_batch_size=16, log_every=1, eval_every=0, checkpoint_every=0, progress=False)
  c.optim.update(lr=5e-2, warmup_steps=0, weight_decay=0.0)
  return c


def _train(tmp_path_factory, name, config):
  wd = tmp_path_factory.mktemp(name) / "run"
  summary = tpp_main.run(config, str(wd))
  return wd, summary


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, hf_base):
  return _train(tmp_path_factory, "lora", make_config(hf_base, type="lora", targets="q,v,fc1"))


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, hf_base):  # init.path as the weights file, not the folder
  return _train(tmp_path_factory, "dora", make_config(hf_base / "model.safetensors", type="dora", rslora=True,
                                                      targets="k,o,fc2"))


@pytest.fixture(scope="module")
def ssf_run(tmp_path_factory, hf_base):
  return _train(tmp_path_factory, "ssf", make_config(hf_base, type="ssf"))


def cli(args, capsys=None):
  """tpp_jax.export.main in-process -> (exit code, stdout, stderr)."""
  try:
    code = export.main([str(a) for a in args])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr() if capsys else ("", "")
  return code, out, err


def images(n=2, seed=0):
  return np.random.RandomState(seed).randn(n, 3, SIZE, SIZE).astype(np.float32)


def our_tokens(run, x_nchw):
  return np.asarray(run.encoder.apply({"params": run.params["encoder"]}, x_nchw.transpose(0, 2, 3, 1))["tokens"])


def max_leaf_diff(a, b):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  return max(float(np.abs(fa[k] - fb[k]).max()) for k in fa)


# ------------------------------------------------------------------------------------------------
# adapter
# ------------------------------------------------------------------------------------------------

def test_adapter_export_then_init_adapter_reproduces_the_run(lora_run, hf_base, tmp_path):
  wd, summary = lora_run
  out = tmp_path / "adapter"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "tpp_jax.export", str(wd), str(out), "--format", "adapter",
                      "--checkpoint", "latest"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
  meta = json.loads((out / "adapter_config.json").read_text())
  assert meta["format"] == "tpp_jax.adapter" and meta["format_version"] == 1
  assert meta["stage"] == "finetune" and meta["step"] == 3 and meta["init"]["path"] == str(hf_base)
  assert meta["peft"]["type"] == "lora" and meta["task"]["num_classes"] == 2 and meta["model"]["width"] == WIDTH
  assert meta["head"] == ["head/fc/bias", "head/fc/kernel"]
  assert all(k.startswith("encoder/") and k.rsplit("/", 1)[1] in ("lora_a", "lora_b") for k in meta["target"])

  # a new finetune run that starts from the adapter: same parameters -> the same logits and test metrics
  cfg = make_config(hf_base, type="lora", targets="q,v,fc1")
  cfg.init.adapter = str(out)
  trainer = engine.Trainer(cfg, tmp_path / "ft")
  assert trainer.target_init["kind"] == "adapter" and trainer.target_init["step"] == 3
  run = restore.load_run(wd, "latest")
  x = images().transpose(0, 2, 3, 1)
  ref = np.asarray(run.objective.logits(run.params, run.aux, x, False)[0])
  got = np.asarray(trainer.objective.logits(jax.device_get(trainer.state["params"]), trainer.state["aux"], x,
                                            False)[0])
  assert report("adapter round trip: init.adapter logits vs the run's", np.abs(got - ref).max()) == 0.0
  metrics = trainer.evaluate("test")
  assert metrics == pytest.approx(summary["final"]["test"], abs=1e-6)

  # the same folder as target_init: target leaves only, the head stays a fresh one
  cfg = make_config(hf_base, type="lora", targets="q,v,fc1")
  cfg.target_init = str(out)
  params = jax.device_get(engine.Trainer(cfg, tmp_path / "ti").state["params"])
  assert max_leaf_diff(params["encoder"], run.params["encoder"]) == 0.0
  assert not np.array_equal(params["head"]["fc"]["kernel"], run.params["head"]["fc"]["kernel"])

  # what differs is named: the task head's num_classes, the peft rank, the backbone
  bad = make_config(hf_base, type="lora", targets="q,v,fc1")
  bad.task.num_classes = 3
  bad.init.adapter = str(out)
  with pytest.raises(ConfigError, match=r"task\.num_classes.*2.*3"):
    engine.Trainer(bad, tmp_path / "bad1")
  bad = make_config(hf_base, type="lora", targets="q,v,fc1")
  bad.peft.rank, bad.target_init = 8, str(out)
  with pytest.raises(ConfigError, match=r"peft\.rank"):
    engine.Trainer(bad, tmp_path / "bad2")
  bad = make_config("", type="lora", targets="q,v,fc1")
  bad.init.adapter = str(out)
  with pytest.raises(ConfigError, match="different weights"):
    engine.Trainer(bad, tmp_path / "bad3")


# ------------------------------------------------------------------------------------------------
# peft
# ------------------------------------------------------------------------------------------------

def _peft_export(run_dir, tmp_path, name, capsys):
  out = tmp_path / f"{name}_peft"
  code, _, err = cli([run_dir, out, "--format", "peft"], capsys)
  assert code in (0, None), err
  assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
  run = restore.load_run(run_dir, "best")
  return out, run


def test_peft_lora_export_loads_in_peftmodel_and_back(lora_run, hf_base, tmp_path, capsys):
  wd, _ = lora_run
  out, run = _peft_export(wd, tmp_path, "lora", capsys)
  # the README snippet, as written
  code = SNIPPET.replace('"hf_vit"', repr(str(hf_base))).replace('"exports/hf_b16_peft"', repr(str(out)))
  code = code.replace("224, 224", f"{SIZE}, {SIZE}")
  assert repr(str(out)) in code and repr(str(hf_base)) in code and f"{SIZE}, {SIZE}" in code
  ns = {}
  exec(compile(code, "README snippet", "exec"), ns)  # pylint: disable=exec-used
  x = ns["images"].numpy()
  ref, ours = ns["tokens"].detach().numpy(), our_tokens(run, x)
  assert report("peft LoRA: PeftModel last_hidden_state vs our encoder", np.abs(ref - ours).max()) <= TOL
  with ns["model"].disable_adapter(), torch.no_grad():  # the trained LoRA weights matter
    assert np.abs(ns["model"](pixel_values=ns["images"]).last_hidden_state.numpy() - ours).max() > 100 * TOL

  # and back: the peft folder as target_init loads exactly our LoRA leaves
  cfg = make_config(hf_base, type="lora", targets="q,v,fc1")
  cfg.target_init = str(out)
  t = engine.Trainer(cfg, tmp_path / "from_peft")
  assert t.target_init["kind"] == "peft"
  params = jax.device_get(t.state["params"])
  assert report("peft LoRA -> target_init round trip (all encoder leaves)",
                max_leaf_diff(params["encoder"], run.params["encoder"])) == 0.0

  readme = ROOT / "README.md"
  if README_SECTION in readme.read_text():
    assert SNIPPET in readme.read_text(), "README's export snippet differs from tests/test_export.py::SNIPPET"


def test_peft_dora_rslora_export_loads_in_peftmodel_and_back(dora_run, hf_base, tmp_path, capsys):
  wd, _ = dora_run
  out, run = _peft_export(wd, tmp_path, "dora", capsys)
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["use_dora"] and cfg["use_rslora"] and sorted(cfg["target_modules"]) == ["fc2", "k_proj", "o_proj"]
  base = transformers.ViTModel.from_pretrained(str(hf_base))
  model = peft.PeftModel.from_pretrained(base, str(out)).eval()
  x = images(seed=1)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  assert report("peft DoRA+rsLoRA: PeftModel vs our encoder", np.abs(ref - our_tokens(run, x)).max()) <= TOL

  cfg = make_config(hf_base / "model.safetensors", type="dora", rslora=True, targets="k,o,fc2")
  cfg.target_init = str(out)
  params = jax.device_get(engine.Trainer(cfg, tmp_path / "from_peft").state["params"])
  assert report("peft DoRA -> target_init round trip", max_leaf_diff(params["encoder"], run.params["encoder"])) == 0.0
  cfg.peft.rslora = False
  with pytest.raises(ConfigError, match=r"peft\.rslora"):
    engine.Trainer(cfg, tmp_path / "bad")


# ------------------------------------------------------------------------------------------------
# merged
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["lora_run", "dora_run", "ssf_run"])
def test_merged_export_is_a_vitmodel_with_equal_outputs(which, request, tmp_path, capsys):
  wd, _ = request.getfixturevalue(which)
  out = tmp_path / "merged"
  code, _, err = cli([wd, out, "--format", "merged", "--checkpoint", "latest"], capsys)
  assert code in (0, None), err
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "head.safetensors", "head_config.json",
                                                   "model.safetensors"]
  model, info = transformers.ViTModel.from_pretrained(str(out), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  run = restore.load_run(wd, "latest")
  x = images(seed=2)
  with torch.no_grad():
    hf_out = model.eval()(pixel_values=torch.from_numpy(x))
  tokens = hf_out.last_hidden_state.numpy()
  assert report(f"merged ({which}): ViTModel vs our unmerged encoder", np.abs(tokens - our_tokens(run, x)).max()) <= TOL
  base = transformers.ViTModel.from_pretrained(str(request.getfixturevalue("hf_base"))).eval()
  with torch.no_grad():  # the trained PEFT parameters really are folded in
    assert np.abs(base(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy() - tokens).max() > 100 * TOL
  # the head beside it: logits = cls token @ kernel + bias
  from safetensors.numpy import load_file
  head = load_file(str(out / "head.safetensors"))
  head_cfg = json.loads((out / "head_config.json").read_text())
  assert head_cfg["pooling"] == "cls" and head_cfg["num_classes"] == 2
  logits = tokens[:, 0] @ head["head/fc/kernel"] + head["head/fc/bias"]
  ref = np.asarray(run.objective.logits(run.params, run.aux, x.transpose(0, 2, 3, 1), False)[0])
  assert report(f"merged ({which}): head logits vs ours", np.abs(logits - ref).max()) <= TOL


# ------------------------------------------------------------------------------------------------
# formats that do not apply: one clear error naming what works; never overwrite
# ------------------------------------------------------------------------------------------------

def _config_only_run(src, dst, **changes):
  """A run folder holding only a (changed) config.json: the format checks read nothing else."""
  cfg = json.loads((src / "config.json").read_text())
  for key, value in changes.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  dst.mkdir(parents=True)
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def test_formats_that_do_not_apply_are_one_clear_error(lora_run, ssf_run, tmp_path, capsys):
  lora, ssf = lora_run[0], ssf_run[0]
  house = ROOT / "tpp_jax" / "assets" / "house_vit_ti8_64" / "house_vit_ti8_64.safetensors"
  cases = [  # (run, format, what the message must name)
      (ssf, "peft", ["LoRA / DoRA / rsLoRA", "peft.type='ssf'", "--format adapter", "--format merged"]),
      (_config_only_run(lora, tmp_path / "vpt", **{"peft.type": "vpt"}), "peft", ["--format adapter"]),
      (_config_only_run(lora, tmp_path / "vpt2", **{"peft.type": "vpt"}), "merged", ["'vpt'", "--format adapter"]),
      (_config_only_run(lora, tmp_path / "adpt", **{"peft.type": "adapter"}), "merged", ["--format adapter"]),
      (_config_only_run(lora, tmp_path / "ls", **{"model.layer_scale": True}), "merged", ["LayerScale",
                                                                                           "--format adapter"]),
      (_config_only_run(lora, tmp_path / "lin", stage="linear"), "adapter", ["no target", "--format merged"]),
      (_config_only_run(lora, tmp_path / "lin2", stage="linear"), "peft", ["no target", "--format merged"]),
      (_config_only_run(lora, tmp_path / "house", **{"init.path": str(house)}), "peft",
       ["Hugging Face", "not a Hugging Face checkpoint", "--format adapter"]),
      (_config_only_run(lora, tmp_path / "rand", **{"init.path": ""}), "peft", ["random init", "--format merged"]),
  ]
  for run_dir, fmt, words in cases:
    out = tmp_path / f"out_{run_dir.name}_{fmt}"
    code, _, err = cli([run_dir, out, "--format", fmt], capsys)
    assert code == 2, (run_dir, fmt, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
      assert w in err, (w, err)
    assert not out.exists()

  # OUT already holding a file: refused, the file is untouched
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  code, _, err = cli([lora, out, "--format", "adapter"], capsys)
  assert code == 2 and "already exists" in err and "nothing is overwritten" in err
  assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
  shutil.rmtree(out)
