"""Hub ids as init.path (checkpoints/hub.py), offline: hf://ORG/NAME[@REVISION] and timm://NAME read from a
Hugging Face cache the tests lay out in huggingface_hub's own layout (models--ORG--NAME/refs, snapshots, blobs),
with HF_HUB_OFFLINE set. The weights are a tiny ViTModel written by transformers' save_pretrained."""
import hashlib
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from test_convert import hf_to_timm, perturb  # noqa: E402  (renaming written independently of the library)

from tpp_jax import build as build_lib  # noqa: E402
from tpp_jax.checkpoints import adapter as adapter_lib  # noqa: E402
from tpp_jax.checkpoints import hub  # noqa: E402
from tpp_jax.checkpoints import load as load_lib  # noqa: E402
from tpp_jax.config import ConfigError  # noqa: E402

from conftest import load_config, one_error_line, run_cli  # noqa: E402

W, D, H, M, P, S = 64, 2, 2, 256, 8, 32
ARG = (f"demo,smoke,px32,steps=2,checkpoint_every=0,eval_splits=(),batch_size=8,model.variant=Mu/{P},"
       f"model.depth={D},model.pos_emb=learned,model.pooling=cls,model.ln_eps=1e-12")


def cache_repo(cache, repo: str, files: dict, ref: str = "main") -> tuple:
  """huggingface_hub's cache layout for `repo`: refs/REF -> a commit, snapshots/COMMIT/NAME -> ../../blobs/SHA256.
  Returns (snapshot folder, commit)."""
  base = cache / f"models--{repo.replace('/', '--')}"
  commit = hashlib.sha1(repo.encode()).hexdigest()
  snap = base / "snapshots" / commit
  (base / "blobs").mkdir(parents=True, exist_ok=True)
  snap.mkdir(parents=True)
  (base / "refs").mkdir(exist_ok=True)
  (base / "refs" / ref).write_text(commit)
  for name, data in files.items():
    blob = base / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snap / name).symlink_to(os.path.relpath(blob, snap))
  return snap, commit


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """(save_pretrained folder, the torch model) of a tiny HF ViTModel."""
  cfg = transformers.ViTConfig(hidden_size=W, num_hidden_layers=D, num_attention_heads=H, intermediate_size=M,
                               patch_size=P, image_size=S, layer_norm_eps=1e-12, hidden_act="gelu")
  model = perturb(transformers.ViTModel(cfg, add_pooling_layer=False), 1)
  folder = tmp_path_factory.mktemp("local") / "tiny-vit"
  model.save_pretrained(folder)
  return folder, model


@pytest.fixture
def cache(tmp_path, monkeypatch, hf_model):
  """An offline Hugging Face cache holding hf://org/tiny-vit (the save_pretrained files)."""
  root = tmp_path / "hub"
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(root))
  # huggingface_hub read both at import: its module constants are what snapshot_download uses
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
  folder = hf_model[0]
  cache_repo(root, "org/tiny-vit", {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")})
  return root


def _load(path):
  c = load_config("experiment", ARG)
  c.init.path = str(path)
  enc, _, source = load_lib.load_backbone(c, build_lib.build_encoder(c))
  return jax.tree_util.tree_map(np.asarray, enc), source


def test_hf_id_loads_the_same_encoder_as_the_local_folder(cache, hf_model):
  local, _ = _load(hf_model[0])
  snap = next((cache / "models--org--tiny-vit" / "snapshots").iterdir())
  assert hub.local_path("hf://org/tiny-vit") == snap
  assert hub.local_path(f"hf://org/tiny-vit@{snap.name}") == snap  # a commit as @REVISION
  got, source = _load("hf://org/tiny-vit")
  assert source == f"hf_vit checkpoint {snap / 'model.safetensors'} (hf://org/tiny-vit)"
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, local)
  # export's view of the backbone (adapter.hf_format / hf_folder) goes through the same resolution
  assert adapter_lib.hf_format("hf://org/tiny-vit") == ("hf_vit", snap / "model.safetensors")
  assert adapter_lib.hf_folder("hf://org/tiny-vit") == snap
  assert hub.local_path(str(hf_model[0])) == hf_model[0]  # a local path passes through


def test_timm_id_reads_a_timm_named_safetensors(cache, hf_model):
  """A timm Hub repo: model.safetensors with timm names (fused qkv, a classifier head) and timm's config.json."""
  from safetensors.numpy import save as save_safetensors
  sd = {k: v.numpy() for k, v in hf_to_timm(hf_model[1].state_dict(), D).items()}
  sd["head.weight"], sd["head.bias"] = np.zeros((10, W), np.float32), np.zeros(10, np.float32)
  timm_cfg = {"architecture": "vit_tiny_test", "num_classes": 10, "num_features": W, "global_pool": "token",
              "pretrained_cfg": {"tag": "test", "input_size": [3, S, S], "mean": [0.5] * 3, "std": [0.5] * 3,
                                 "classifier": "head"}}
  snap, _ = cache_repo(cache, "timm/vit_tiny_test.test", {
      "config.json": json.dumps(timm_cfg).encode(), "model.safetensors": save_safetensors(sd)})
  got, source = _load("timm://vit_tiny_test.test")
  assert source == f"timm checkpoint {snap / 'model.safetensors'} (timm://vit_tiny_test.test)"
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, _load(hf_model[0])[0])


def test_a_repo_with_pytorch_bin_only(cache, hf_model):
  sd = {k: v.clone() for k, v in hf_model[1].state_dict().items()}
  import io
  buf = io.BytesIO()
  torch.save(sd, buf)
  snap, _ = cache_repo(cache, "org/bin-only", {"config.json": (hf_model[0] / "config.json").read_bytes(),
                                               "pytorch_model.bin": buf.getvalue()})
  assert hub.local_path("hf://org/bin-only") == snap
  jax.tree_util.tree_map(np.testing.assert_array_equal, _load("hf://org/bin-only")[0], _load(hf_model[0])[0])


def test_missing_ids_are_one_line_naming_the_id_and_the_fix(cache):
  with pytest.raises(FileNotFoundError) as e:
    hub.local_path("hf://org/missing")
  msg = str(e.value)
  assert "\n" not in msg and "init.path='hf://org/missing'" in msg and "'org/missing' is not in the" in msg
  assert str(cache) in msg and "HF_HUB_OFFLINE is set" in msg and "--config.init.path=DIR" in msg
  with pytest.raises(FileNotFoundError, match=r"'org/tiny-vit' at revision 'v2' is not in the Hugging Face cache"):
    hub.local_path("hf://org/tiny-vit@v2")
  cache_repo(cache, "org/no-weights", {"config.json": b"{}"})
  with pytest.raises(FileNotFoundError, match=r"holds neither model.safetensors nor pytorch_model.bin"):
    hub.local_path("hf://org/no-weights")
  for bad in ("hf://", "hf://a/b/c", "hf://org/name@", "timm://org/name"):
    with pytest.raises(ConfigError, match=r"is not a Hub id .*write it as hf://ORG/NAME"):
      hub.local_path(bad)
  assert adapter_lib.hf_weights("hf://org/missing") is None  # export: like a local file deleted since


def test_cli_missing_hub_id_is_one_error_line(tmp_path, monkeypatch, hf_model):
  """`python -m tpp_jax.main` with a Hub id that is not cached, offline; HF_HOME places the cache."""
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  home = tmp_path / "hf_home"
  folder = hf_model[0]
  cache_repo(home / "hub", "org/tiny-vit", {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")})
  r = run_cli(["--config", f"configs/experiment.py:{ARG}", "--workdir", str(tmp_path / "run"),
               "--config.init.path=hf://org/tiny-vitt"], env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
  line = one_error_line(r)
  assert "init.path='hf://org/tiny-vitt'" in line and f"{home / 'hub'}" in line, line
  assert "HF_HUB_OFFLINE is set" in line and "check the name" in line, line
