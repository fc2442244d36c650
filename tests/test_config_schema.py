"""One config schema (base_config), every field read by some code, optim.layer_decay wired."""
from __future__ import annotations

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from tpp_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Code that consumes the config. tpp_jax/config.py (the schema, its validation and CLI parsing) is left out: a field
# that is only declared and validated is still dead.
SCHEMA = ROOT / "tpp_jax" / "config.py"

# Fields read indirectly (the name never appears as an attribute / string); say where they are read. Empty today.
ALLOW_INDIRECT: dict[str, str] = {}
# Fields another module owns: checked to be read in that very file.
READ_IN = {
    "pretext.local_crops": "tpp_jax/objectives/dino.py",  # DINO multi-crop
    "pretext.local_crop_size": "tpp_jax/objectives/dino.py",
    "pretext.local_crop_scale": "tpp_jax/objectives/dino.py",
    "optim.layer_decay": "tpp_jax/build.py",  # make_tx
    "data.prefetch": "tpp_jax/data/config.py",  # resolve(); passed to pipeline.train_iter by the engine
}


def source_files() -> list[pathlib.Path]:
  files = sorted((ROOT / "tpp_jax").rglob("*.py")) + sorted((ROOT / "configs").glob("*.py"))
  return [f for f in files if f != SCHEMA]


def names_read(text: str) -> set[str]:
  """Names a module reads: `x.name` (load), `x["name"]` / `.get("name")` / getattr / lookup(c, "a.name").

  A string constant counts (its last dotted part, and the whole dotted path) unless it is a docstring or the key
  of an assignment (`c["name"] = 1`); keyword names (`c.update(name=1)`) and attribute stores never count.
  """
  tree = ast.parse(text)
  skip = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
      skip.add(id(node.slice))
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
        skip.add(id(node.body[0].value))
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
      out.add(node.attr)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
      if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", node.value):
        out.update({node.value, node.value.rsplit(".", 1)[-1]})
  return out


def leaves(c: mlc.ConfigDict, prefix: str = ""):
  for k in c.keys():
    v = c[k]
    if isinstance(v, mlc.ConfigDict):
      yield from leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def unread_fields(config: mlc.ConfigDict, files=None) -> list[str]:
  """Leaves of `config` whose name (or dotted path) no consumer reads, minus ALLOW_INDIRECT."""
  read = set()
  for f in files if files is not None else source_files():
    read |= names_read(f.read_text())
  return [p for p in leaves(config)
          if p not in ALLOW_INDIRECT and p not in read and p.rsplit(".", 1)[-1] not in read]


def test_every_base_config_field_is_read():
  unread = unread_fields(config_lib.base_config())
  assert not unread, (f"base_config fields that no code in tpp_jax/ or configs/ reads: {unread}. Wire them or "
                      "delete them (or, for an indirect read, add them to ALLOW_INDIRECT saying where).")


def test_the_check_reports_a_fake_unread_field():
  c = config_lib.base_config()
  c.optim.zz_never_read_knob = 0.5
  c.data.augment.zz_unused_flip = True
  assert sorted(unread_fields(c)) == ["data.augment.zz_unused_flip", "optim.zz_never_read_knob"]


def test_names_read_access_styles(tmp_path):
  src = '''
"""zz_doc is only documented."""
def f(config, cfg, c):
  a = config.optim.zz_attr
  b = cfg["zz_item"] + c.get("zz_get") + getattr(c, "zz_getattr")
  d = lookup(cfg, "augment.zz_dotted")
  c.zz_stored = 1
  c["zz_item_stored"] = 2
  c.update(zz_keyword=3)
'''
  read = names_read(src)
  for name in ("zz_attr", "zz_item", "zz_get", "zz_getattr", "zz_dotted", "augment.zz_dotted"):
    assert name in read, name
  for name in ("zz_doc", "zz_stored", "zz_item_stored", "zz_keyword"):
    assert name not in read, name
  f = tmp_path / "m.py"
  f.write_text(src)
  c = mlc.ConfigDict(dict(zz_attr=1, zz_stored=2, data=dict(augment=dict(zz_dotted=3, zz_keyword=4))))
  assert sorted(unread_fields(c, [f])) == ["data.augment.zz_keyword", "zz_stored"]


def test_allow_list_is_explicit_and_current():
  fields = set(leaves(config_lib.base_config()))
  assert set(ALLOW_INDIRECT) <= fields, "ALLOW_INDIRECT names fields that base_config no longer has"
  for path in ALLOW_INDIRECT.values():
    assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("field", sorted(READ_IN))
def test_owned_fields_are_read_where_they_belong(field):
  assert field in set(leaves(config_lib.base_config()))
  assert not unread_fields(mlc.ConfigDict({field.rsplit(".", 1)[-1]: 0}), [ROOT / READ_IN[field]]), (
      f"{field} is not read in {READ_IN[field]}")


# ------------------------------------------------------------------------------------------------ one data schema


def test_data_config_has_no_defaults_of_its_own():
  """tpp_jax.data.config resolves base_config().data: a partial block takes base_config's values."""
  import dataclasses

  from tpp_jax.data import config as data_config
  base = config_lib.base_config().data
  assert not [f.name for f in dataclasses.fields(data_config.DataConfig)
              if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
  full, empty = data_config.resolve(base), data_config.resolve({})
  assert full == empty
  assert empty.augment.crop_scale == tuple(base.augment.crop_scale) and empty.augment.hflip == base.augment.hflip
  assert empty.augment.crop_ratio == tuple(base.augment.crop_ratio)
  assert empty.prefetch == base.prefetch and empty.tfds_image_key == base.tfds_image_key
  # every resolved field is a base_config field (nothing the CLI would refuse)
  names = {f.name for f in dataclasses.fields(data_config.DataConfig)}
  names |= {f"augment.{f.name}" for f in dataclasses.fields(data_config.Augment)}
  assert names - {"augment"} <= set(leaves(base))
  # explicit None keeps its meaning (no random crop); tfds_splits from a CLI-friendly string
  assert data_config.resolve({"augment": {"crop_scale": None}}).augment.crop_scale is None
  assert data_config.resolve({"tfds_splits": "train=train[:90%], val=train[90%:]"}).tfds_splits == {
      "train": "train[:90%]", "val": "train[90%:]"}
  with pytest.raises(ValueError, match="data.tfds_splits"):
    data_config.resolve({"tfds_splits": "train"})
  with pytest.raises(ValueError, match="data.prefetch"):
    data_config.resolve({"prefetch": -1})


def test_new_data_fields_are_cli_overridable():
  c = config_lib.base_config()
  config_lib.apply_arg(c, "data.prefetch=4,data.augment.crop_ratio=(0.5,2.0),data.tfds_label_key=y,"
                          "data.tfds_splits='train=train[:4],val=train[4:]'")
  from tpp_jax.data import config as data_config
  r = data_config.resolve(c.data)
  assert (r.prefetch, r.augment.crop_ratio, r.tfds_label_key) == (4, (0.5, 2.0), "y")
  assert r.tfds_splits == {"train": "train[:4]", "val": "train[4:]"}


# ------------------------------------------------------------------------------------------------ layer decay


def _tiny(layer_decay: float, depth: int = 3):
  from tpp_jax import build as build_lib
  from tpp_jax import partition
  c = config_lib.base_config()
  c.stage = "full"
  c.peft.type = "none"
  c.model.update(variant="Mu/8", image_size=16, depth=depth)
  c.optim.update(layer_decay=layer_decay, warmup_steps=0)
  c.steps = 10
  enc = build_lib.build_encoder(c)
  params = {"encoder": enc.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"],
            "head": {"kernel": jnp.zeros((64, 2)), "bias": jnp.zeros((2,))}}
  labels = partition.label_tree(params, partition.default_rules("full", "none"))
  tx, _ = build_lib.make_tx(c, labels)
  return c, params, labels, tx


def _expected_scale(path: str, decay: float, depth: int) -> float:
  """BEiT/MAE param groups, written out independently of build_lib.make_tx."""
  m = re.match(r"encoder/blocks_(\d+)/", path)
  if m:
    return decay ** (depth - int(m.group(1)))
  if re.match(r"encoder/(patch_embed|cls|pos_embed)(/|$)", path):
    return decay ** (depth + 1)
  return 1.0  # encoder/norm, the head


def _updates(tx, params, grads, steps=2):
  state = tx.init(params)
  out = []
  for _ in range(steps):
    upd, state = tx.update(grads, state, params)
    out.append(upd)
  return out


def test_layer_decay_scales_each_leaf_update_by_the_beit_formula():
  decay, depth = 0.5, 3
  _, params, _, tx = _tiny(decay, depth)
  _, _, _, tx_ref = _tiny(1.0, depth)
  leaves_, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves_))
  grads = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves_)])
  seen = {}
  for upd, ref in zip(_updates(tx, params, grads), _updates(tx_ref, params, grads)):
    for (path, u), r in zip(jax.tree_util.tree_flatten_with_path(upd)[0], jax.tree_util.tree_leaves(ref)):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      r = np.asarray(r)
      assert np.abs(r).min() > 0, name
      ratio = np.asarray(u) / r
      want = _expected_scale(name, decay, depth)
      np.testing.assert_allclose(ratio, want, rtol=1e-5, err_msg=name)
      seen[name.split("/")[1] if name.startswith("encoder/") else name.split("/")[0]] = float(ratio.mean())
  assert seen == pytest.approx({"patch_embed": 0.0625, "cls": 0.0625, "pos_embed": 0.0625, "blocks_0": 0.125,
                                "blocks_1": 0.25, "blocks_2": 0.5, "norm": 1.0, "head": 1.0}, rel=1e-5)


def test_layer_decay_off_keeps_the_optimizer_state():
  """1.0 (the default) adds nothing: checkpoints of earlier runs keep their opt_state structure."""
  import optax

  from tpp_jax import partition
  _, params, labels, tx = _tiny(1.0)
  plain = partition.make_optimizer(labels, optax.adamw(1e-3))
  assert type(tx.init(params)) is type(plain.init(params))  # the partition state, not wrapped by a chain


def test_layer_decay_is_validated():
  c = config_lib.base_config()
  c.optim.layer_decay = 0.0
  with pytest.raises(config_lib.ConfigError, match="optim.layer_decay"):
    config_lib.validate(c)


def test_one_json_reader(tmp_path):
  from tpp_jax.jsonio import read_json, read_jsonl
  (tmp_path / "a.json").write_text('{"stage": "tpp"}')
  (tmp_path / "list.json").write_text("[1]")
  (tmp_path / "bad.json").write_text("{")
  assert read_json(tmp_path / "a.json", require_object=True) == {"stage": "tpp"}
  assert read_json(tmp_path / "list.json") == [1]
  with pytest.raises(config_lib.ConfigError, match="list.json does not hold a JSON object"):
    read_json(tmp_path / "list.json", require_object=True)
  with pytest.raises(config_lib.ConfigError, match="bad.json is not valid JSON"):
    read_json(tmp_path / "bad.json")
  (tmp_path / "m.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n{"st')  # torn last line
  assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]
  assert read_jsonl(tmp_path / "none.jsonl") == []
