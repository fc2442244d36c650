"""tpp_jax.export: adapter / peft / merged exports of tiny trained runs, checked against PyTorch.

The runs fine-tune LoRA, DoRA + rsLoRA and SSF for 3 steps on a tiny Hugging Face ViTModel the test saves
(width 32, depth 2, 32 px, patch 8) with the shipped demo data (2 classes). Their merged exports are
transformers ViTForImageClassification folders, their peft exports carry the classifier as modules_to_save;
logits and probabilities are compared with transformers / peft. Run with -s to see the max abs differences.
"""
import csv
import dataclasses
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
MEAN, STD = (0.48, 0.5, 0.52), (0.22, 0.25, 0.28)  # not transformers' ViTImageProcessor defaults
DEMO = ROOT / "tpp_jax" / "assets" / "demo_cxr_64" / "demo_cxr_64.npz"
README_SECTION = "Use a trained model: export"
# The README's PyTorch snippet (a classification run's peft export, 2 classes like the runs here), run as written
# with the paths and the image size substituted.
SNIPPET = """\
import torch, transformers, peft
base = transformers.ViTForImageClassification.from_pretrained("hf_vit", num_labels=2)  # the run's init.path
model = peft.PeftModel.from_pretrained(base, "exports/hf_b16_peft").eval()  # OUT of --format peft (+ its head)
images = torch.randn(2, 3, 224, 224)  # NCHW, normalised with the run's data.mean / data.std
logits = model(pixel_values=images).logits  # = the tpp_jax run's logits
"""

def report(name, diff):
  print(f"\nMAXDIFF {name}: {diff:.3g}", file=sys.__stdout__, flush=True)  # past capsys, shown with -s
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
  c.data.update(source="npz", path=str(DEMO), image_size=SIZE, channels=3, mean=MEAN, std=STD, max_train_examples=32,
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


def our_logits(run, x_nchw):
  return np.asarray(run.objective.logits(run.params, run.aux, x_nchw.transpose(0, 2, 3, 1), False)[0])


def hf_logits(model, x_nchw):
  with torch.no_grad():
    return model.eval()(pixel_values=torch.from_numpy(x_nchw)).logits.numpy()


def merged_export(run_dir, out, capsys, checkpoint="best"):
  """--format merged through the CLI -> the loaded ViTForImageClassification (every weight from the folder)."""
  code, _, err = cli([run_dir, out, "--format", "merged", "--checkpoint", checkpoint], capsys)
  assert code in (0, None), err
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
  model, info = transformers.ViTForImageClassification.from_pretrained(str(out), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


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
  assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                   "preprocessor_config.json"]
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["modules_to_save"] == ["classifier"] and cfg["auto_mapping"]["base_model_class"] == \
      "ViTForImageClassification"
  from safetensors.numpy import load_file
  keys = sorted(load_file(str(out / "adapter_model.safetensors")))
  assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys, keys
  assert all(k.startswith("base_model.model.vit.layers.") for k in keys if "lora_" in k), keys
  readme = (out / "README.md").read_text()
  assert "modules_to_save" in readme and "not part of" not in readme
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
  x, model = ns["images"].numpy(), ns["model"]
  ref = ns["logits"].detach().numpy()
  assert report("peft LoRA: PeftModel(ViTForImageClassification) logits vs ours", np.abs(ref - our_logits(run, x)).max()
                ) <= TOL
  with torch.no_grad():
    tokens = model.base_model.model.vit(pixel_values=ns["images"]).last_hidden_state.numpy()
    assert report("peft LoRA: its ViT tokens vs our encoder", np.abs(tokens - our_tokens(run, x)).max()) <= TOL
    with model.disable_adapter():  # the trained LoRA weights matter
      plain = model.base_model.model.vit(pixel_values=ns["images"]).last_hidden_state.numpy()
    assert np.abs(plain - tokens).max() > 100 * TOL

  # the same model as --format merged writes, and as peft's merge_and_unload() makes (the README says so)
  merged = merged_export(wd, tmp_path / "lora_merged", capsys)
  assert report("peft LoRA vs merged export: logits", np.abs(hf_logits(merged, x) - ref).max()) <= TOL
  unloaded = model.merge_and_unload()
  assert type(unloaded).__name__ == "ViTForImageClassification"
  assert report("peft merge_and_unload vs merged export: logits",
                np.abs(hf_logits(unloaded, x) - hf_logits(merged, x)).max()) <= TOL

  # the README written beside the adapter: its code, run as written on a grey PIL image, gives our probabilities
  from PIL import Image

  from tpp_jax.data import transforms
  code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
  image = Image.fromarray(np.load(DEMO)["test_images"][0]).resize((SIZE, SIZE), Image.BILINEAR)
  ns = {"image": image}
  exec(compile(code, "export README", "exec"), ns)  # pylint: disable=exec-used
  x = transforms.make_transform(run.config.data, train=False)({"image": np.asarray(image)[..., None]})["image"]
  ours = np.asarray(jax.nn.softmax(our_logits(run, x[None].transpose(0, 3, 1, 2))))
  assert report("peft LoRA: the export README's code vs our probabilities", np.abs(
      ns["probs"].detach().numpy() - ours).max()) <= TOL

  # and back: the peft folder as target_init loads exactly our LoRA leaves (the classifier is not a target leaf)
  cfg = make_config(hf_base, type="lora", targets="q,v,fc1")
  cfg.target_init = str(out)
  t = engine.Trainer(cfg, tmp_path / "from_peft")
  assert t.target_init["kind"] == "peft"
  params = jax.device_get(t.state["params"])
  assert report("peft LoRA -> target_init round trip (all encoder leaves)",
                max_leaf_diff(params["encoder"], run.params["encoder"])) == 0.0


def test_readme_export_snippet_is_the_tested_one():
  readme = (ROOT / "README.md").read_text()
  if README_SECTION in readme:
    assert SNIPPET in readme, "README's export snippet differs from tests/test_export.py::SNIPPET"


def test_peft_dora_rslora_export_loads_in_peftmodel_and_back(dora_run, hf_base, tmp_path, capsys):
  wd, _ = dora_run
  out, run = _peft_export(wd, tmp_path, "dora", capsys)
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["use_dora"] and cfg["use_rslora"] and sorted(cfg["target_modules"]) == ["fc2", "k_proj", "o_proj"]
  base = transformers.ViTForImageClassification.from_pretrained(str(hf_base), num_labels=2)
  model = peft.PeftModel.from_pretrained(base, str(out)).eval()
  x = images(seed=1)
  ref = hf_logits(model, x)
  assert report("peft DoRA+rsLoRA: PeftModel logits vs ours", np.abs(ref - our_logits(run, x)).max()) <= TOL
  merged = merged_export(wd, tmp_path / "dora_merged", capsys)
  assert report("peft DoRA+rsLoRA vs merged export: logits", np.abs(hf_logits(merged, x) - ref).max()) <= TOL

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
def test_merged_export_is_a_vit_classifier_with_equal_logits(which, request, tmp_path, capsys):
  wd, _ = request.getfixturevalue(which)
  model = merged_export(wd, tmp_path / "merged", capsys, "latest")
  run = restore.load_run(wd, "latest")
  assert model.config.architectures == ["ViTForImageClassification"]
  assert model.config.id2label == {0: "0", 1: "1"} and model.config.label2id == {"0": 0, "1": 1}  # npz: no names
  proc = json.loads((tmp_path / "merged" / "preprocessor_config.json").read_text())
  assert proc["size"] == {"height": SIZE, "width": SIZE} and proc["resample"] == 2 and proc["do_rescale"]
  assert proc["image_mean"] == list(MEAN) and proc["image_std"] == list(STD)
  x = images(seed=2)
  logits = hf_logits(model, x)
  assert report(f"merged ({which}): ViTForImageClassification logits vs ours", np.abs(logits - our_logits(run, x)
                                                                                    ).max()) <= TOL
  with torch.no_grad():  # the trained PEFT parameters really are folded in
    tokens = model.vit(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    base = transformers.ViTModel.from_pretrained(str(request.getfixturevalue("hf_base"))).eval()
    assert np.abs(base(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy() - tokens).max() > 100 * TOL


def _png_folder(folder, size, n_grey=4, n_rgb=2):
  """Demo chest X-rays (grey) and random RGB images as PNG files, size x size."""
  from PIL import Image
  folder.mkdir(parents=True)
  for i, im in enumerate(np.load(DEMO)["test_images"][:n_grey]):
    Image.fromarray(im).resize((size, size), Image.BILINEAR).save(folder / f"grey_{i}.png")
  for i, im in enumerate(np.random.RandomState(size).randint(0, 256, (n_rgb, size, size, 3), np.uint8)):
    Image.fromarray(im).save(folder / f"rgb_{i}.png")


def _pipeline_vs_predict(rows, pipe, folder, prefix):
  """max |pipeline score - predictions.csv prob| over the rows whose file starts with `prefix`."""
  rows = [r for r in rows if r["file"].startswith(prefix)]
  assert rows
  res = pipe([str(folder / r["file"]) for r in rows])
  assert all(sorted(d["label"] for d in scores) == ["0", "1"] for scores in res)
  return max(abs(float(r[f"prob_{d['label']}"]) - d["score"]) for r, scores in zip(rows, res) for d in scores)


def test_merged_export_in_the_transformers_pipeline_agrees_with_predict(lora_run, tmp_path, capsys):
  from tpp_jax import predict as predict_lib
  wd, _ = lora_run
  out = tmp_path / "merged"
  merged_export(wd, out, capsys)
  folder = tmp_path / "images"
  _png_folder(folder / "at_size", SIZE)
  _png_folder(folder / "larger", 2 * SIZE, n_grey=2, n_rgb=1)  # both resize them, bilinear
  predict_lib.predict(wd, folder, tmp_path / "pred", progress=False)
  with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 9
  pipe = transformers.pipeline("image-classification", model=str(out), top_k=None)
  assert report("pipeline vs predict: probabilities, images at the model's size",
                _pipeline_vs_predict(rows, pipe, folder, "at_size/")) < 1e-3
  # transformers' PIL backend resizes as we do (PIL bilinear on uint8); its torchvision backend, when installed,
  # antialiases a little differently
  assert report("pipeline vs predict: probabilities, images resized from 2x the size",
                _pipeline_vs_predict(rows, pipe, folder, "larger/")) < 1e-2


def test_merged_export_of_a_grey_run_takes_rgb_in_the_pipeline(lora_run, tmp_path):
  """A 1-channel model becomes a 3-channel ViTForImageClassification (patch kernel x luma), as transformers'
  pipelines feed RGB: on grey images it equals our model on 1 channel. The run is lora_run with its patch kernel
  summed over the colour channels and data/model.channels=1 (exported in-process: no training)."""
  from PIL import Image

  from tpp_jax.data import transforms
  from tpp_jax.models.vit import ViT
  wd, _ = lora_run
  run = restore.load_run(wd, "latest")
  cfg = run.config.copy_and_resolve_references()
  cfg.model.channels, cfg.data.channels, cfg.data.mean, cfg.data.std = 1, 1, (0.45,), (0.2,)
  encoder = ViT(dataclasses.replace(run.encoder.cfg, channels=1), run.encoder.peft)
  params = jax.tree_util.tree_map(np.asarray, run.params)
  kernel = params["encoder"]["patch_embed"]["kernel"]
  params["encoder"]["patch_embed"]["kernel"] = kernel.sum(2, keepdims=True)
  grey = dataclasses.replace(run, config=cfg, encoder=encoder, params=params)
  out = tmp_path / "grey_merged"
  assert export.export_merged(grey, out, *export.check_format(cfg, "merged", wd))[-1] == "preprocessor_config.json"
  folder = tmp_path / "grey_images"
  _png_folder(folder, SIZE, n_grey=3, n_rgb=0)
  files = sorted(folder.iterdir())
  fn = transforms.make_transform(cfg.data, train=False)
  x = np.stack([fn({"image": np.asarray(Image.open(f))[..., None]})["image"] for f in files])
  pooled = encoder.apply({"params": params["encoder"]}, x)["pooled"]
  ours = np.asarray(jax.nn.softmax(run.objective.head.apply({"params": params["head"]}, pooled)))
  pipe = transformers.pipeline("image-classification", model=str(out), top_k=None)
  got = np.asarray([[{d["label"]: d["score"] for d in r}[k] for k in ("0", "1")] for r in pipe(list(map(str, files)))])
  assert report("grey run: pipeline (RGB, folded kernel) vs our 1-channel model", np.abs(got - ours).max()) < 1e-4


def test_merged_export_folds_a_bn_linear_head_into_the_classifier():
  """task.head=bn_linear (linear probes): its eval-mode BatchNorm (no affine) is folded into classifier.*."""
  from tpp_jax.checkpoints import hf_export
  from tpp_jax.models.heads import ClassifierHead
  rs = np.random.RandomState(0)
  feats = rs.randn(4, WIDTH).astype(np.float32)
  head = ClassifierHead(3, "bn_linear")
  params = jax.tree_util.tree_map(lambda v: np.asarray(v) + rs.randn(*v.shape).astype(np.float32),
                                  head.init(jax.random.PRNGKey(0), feats)["params"])
  stats = {"bn": {"mean": rs.randn(WIDTH).astype(np.float32), "var": rs.rand(WIDTH).astype(np.float32) + 0.1}}
  ref = np.asarray(head.apply({"params": params, "batch_stats": stats}, feats))
  sd = {k: torch.from_numpy(v) for k, v in hf_export.classifier_state_dict(params, {"batch_stats": stats},
                                                                             "bn_linear").items()}
  got = torch.nn.functional.linear(torch.from_numpy(feats), sd["classifier.weight"], sd["classifier.bias"]).numpy()
  assert report("bn_linear head folded into the classifier: logits", np.abs(got - ref).max()) <= 1e-5


def test_merged_export_of_a_run_without_task_head_is_a_vitmodel(lora_run, tmp_path):
  """tpp / pretrain runs keep the plain ViTModel (+ the base's pooler): lora_run's encoder as a `tpp` run."""
  wd, _ = lora_run
  run = restore.load_run(wd, "latest")
  cfg = run.config.copy_and_resolve_references()
  cfg.stage = "tpp"
  tpp = dataclasses.replace(run, config=cfg, params={"encoder": run.params["encoder"]}, aux={})
  out = tmp_path / "vitmodel"
  assert export.export_merged(tpp, out, *export.check_format(cfg, "merged", wd)) == ["model.safetensors",
                                                                                      "config.json"]
  model, info = transformers.ViTModel.from_pretrained(str(out), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  x = images(seed=3)
  with torch.no_grad():
    tokens = model.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  assert report("merged tpp run: ViTModel vs our encoder", np.abs(tokens - our_tokens(run, x)).max()) <= TOL


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
      # what transformers' ViTForImageClassification cannot express: mean pooling, a segmentation decoder
      (_config_only_run(lora, tmp_path / "gap", **{"model.pooling": "gap"}), "merged",
       ["ViTForImageClassification", "class token", "model.pooling='gap'", "--format adapter"]),
      (_config_only_run(lora, tmp_path / "gap2", **{"model.pooling": "gap"}), "peft",
       ["ViTForImageClassification", "model.pooling='gap'", "--format adapter"]),
      (_config_only_run(lora, tmp_path / "seg", **{"task.type": "segmentation"}), "merged",
       ["segmentation run", "no transformers class", "--format adapter"]),
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
