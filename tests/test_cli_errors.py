"""User mistakes give ONE short message naming the field / file and the fix, a non-zero exit, no traceback.

DESIGN.md §3 'Errors'. The CLI cases run `python -m tpp_jax.main` in a fresh process (they fail
before any compilation, ~2 s each); the rest call the library in-process and check the exception.
"""
import numpy as np
import pytest
from PIL import Image

from tpp_jax import config as config_lib
from tpp_jax import main

from conftest import SMOKE_CLI as BASE
from conftest import load_config, run_cli, tiny_npz


def _cli_error(args, tmp_path):
  """Runs the CLI, checks the common contract and returns the one error line."""
  r = run_cli(BASE + ["--workdir", str(tmp_path / "run")] + args, timeout=120)
  out = r.stdout + r.stderr
  assert r.returncode != 0, out[-2000:]
  assert "Traceback" not in out, out[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1, r.stderr[-2000:]
  assert len(lines) <= 2, r.stderr[-2000:]  # the message, at most one warning beside it
  msg = errors[0]
  assert len(msg) < 600, msg
  assert "\\n" not in msg and "\\'" not in msg, f"raw repr in the message: {msg}"  # str(KeyError) leaks
  return msg


# -- CLI -------------------------------------------------------------------------------------------

def test_unknown_top_level_key(tmp_path):
  msg = _cli_error(["--config.foo=1"], tmp_path)
  assert "foo" in msg and "unknown" in msg.lower(), msg
  assert "peft" in msg and "steps" in msg, msg  # lists the valid keys


def test_unknown_nested_key(tmp_path):
  msg = _cli_error(["--config.peft.rnk=4"], tmp_path)
  assert "peft.rnk" in msg and "unknown" in msg.lower(), msg
  assert "rank" in msg, msg  # the close match / valid keys


def test_bad_enum_lists_the_choices(tmp_path):
  msg = _cli_error(["--config.peft.type=lorax"], tmp_path)
  assert "peft.type" in msg and "lorax" in msg, msg
  for choice in ("lora", "dora", "adapter", "adaptformer", "vpt", "ssf", "bitfit", "none"):
    assert repr(choice) in msg, (choice, msg)


def test_missing_data_path(tmp_path):
  msg = _cli_error(["--config.data.path=/nonexistent.npz"], tmp_path)
  assert "data.path" in msg and "/nonexistent.npz" in msg and "does not exist" in msg, msg
  assert "--config.data.path" in msg, msg  # how to fix it


def test_labels_outside_num_classes(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
  path = tiny_npz(tmp_path / "three.npz", images, np.arange(6) % 3)
  msg = _cli_error([f"--config.data.path={path}", "--config.task.num_classes=2"], tmp_path)
  assert str(path) in msg and "label 2" in msg and "task.num_classes" in msg, msg
  assert "at least 3" in msg, msg  # the fix


def test_mask_image_size_mismatch(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "seg"
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  rows = ["image,mask,split"]
  for i, split in enumerate(("train", "train", "val", "test")):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    h, w = (32, 24) if i == 1 else (32, 32)
    Image.fromarray(((rng.random((h, w)) > 0.5) * 255).astype(np.uint8)).save(root / "masks" / f"{i}.png")
    rows.append(f"images/{i}.png,masks/{i}.png,{split}")
  (root / "split.csv").write_text("\n".join(rows) + "\n")
  r = run_cli(["--config", "configs/experiment.py:kvasir,smoke,px32", "--workdir", str(tmp_path / "run"),
               f"--config.data.path={root}"], timeout=120)
  out = r.stdout + r.stderr
  assert r.returncode != 0 and "Traceback" not in out, out[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, r.stderr[-2000:]
  msg = errors[0]
  assert str(root / "masks" / "1.png") in msg and "24x32" in msg and "32x32" in msg, msg
  assert "must have the size of its image" in msg, msg


# -- in-process --------------------------------------------------------------------------------

def test_wrong_image_channels(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 2), dtype=np.uint8)
  path = tiny_npz(tmp_path / "two_channels.npz", images, np.arange(6) % 2)
  c = load_config("experiment", "pneumonia,smoke,px32")
  c.data.path = str(path)
  with pytest.raises(ValueError, match=r"two_channels\.npz \[train_images\]") as e:
    main.run(c, str(tmp_path / "run"))
  msg = str(e.value)
  assert "(6, 32, 32, 2)" in msg and "1 or 3 channels" in msg, msg
  assert isinstance(e.value, main.USER_ERRORS)  # the CLI prints it as one line


def test_unknown_key_in_the_config_argument():
  with pytest.raises(config_lib.ConfigError, match=r"Unknown config key 'peft.rnk'.*'rank'"):
    load_config("experiment", "pneumonia,smoke,px32,peft.rnk=4")
  with pytest.raises(config_lib.ConfigError, match=r"Unknown config argument 'nosuchpreset'.*presets"):
    load_config("experiment", "nosuchpreset")


def test_bad_enum_in_process(tmp_path):
  c = load_config("experiment", "pneumonia,smoke,px32,pretext.type=simclr")
  valid = r"pretext.type='simclr' is not valid; choose one of \['mae', 'dino', 'contrastive'\]"
  with pytest.raises(config_lib.ConfigError, match=valid):
    main.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def test_checkpoint_decoder_that_does_not_fit_is_one_error_not_a_half_load(tmp_path):
  """The house backbone ships a 1-block MAE decoder: a 2-block config must not get 1 loaded + 1 random block."""
  from tpp_jax import engine
  c = load_config("experiment", "demo,house,stage=tpp,pretext.decoder_depth=2,data.max_train_examples=32")
  with pytest.raises(config_lib.ConfigError, match=r"decoder.*blocks_1.*init\.load_decoder=False") as e:
    engine.Trainer(c, tmp_path / "run")
  msg = str(e.value)
  assert "1 block(s) of width 128" in msg and "(now 128/2/4/512)" in msg, msg  # what it has, what was asked
  assert isinstance(e.value, main.USER_ERRORS)
  ok = load_config("experiment", "demo,house,stage=tpp,pretext.decoder_depth=2,init.load_decoder=False,"
                   "data.max_train_examples=32")
  assert "MAE decoder" not in engine.Trainer(ok, tmp_path / "run2").init_source  # random decoder, said so
  house = engine.Trainer(load_config("experiment", "demo,house,stage=tpp,data.max_train_examples=32"),
                         tmp_path / "run3")
  assert house.init_source.endswith("(+ MAE decoder)")  # the preset's decoder is the checkpoint's, whole


def test_a_wrong_type_in_the_config_argument_is_one_line_and_one_value_fills_a_tuple():
  with pytest.raises(config_lib.ConfigError, match=r"steps='abc' has the wrong type: the field holds int values"):
    load_config("default", "smoke,steps=abc")
  assert load_config("default", "smoke,pipeline.label_fractions=0.25").pipeline.label_fractions == (0.25,)


def test_help_lists_every_config_field_and_exits_0():
  from tpp_jax import config_help
  r = run_cli(["--help"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout == config_help.text_help()
  for name, _, _ in config_help.fields():
    assert f"  {name} = " in r.stdout, name
