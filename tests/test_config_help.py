"""Every config field has one line of help (tpp_jax/config_help.py), and docs/config.md is generated from it."""
import pathlib

import ml_collections as mlc
from test_config_schema import names_read

from tpp_jax import config as config_lib
from tpp_jax import config_help

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = "python -m tpp_jax.config_help > docs/config.md"


def _leaf_names(node, prefix=""):
  names = []
  for key, value in node.items():
    if isinstance(value, mlc.ConfigDict):
      names += _leaf_names(value, f"{prefix}{key}.")
    else:
      names.append(f"{prefix}{key}")
  return names


def test_every_field_has_help_and_every_help_is_a_field():
  leaves = set(_leaf_names(config_lib.base_config()))
  missing = sorted(leaves - set(config_help.HELP))
  assert not missing, (f"config fields without help: {missing}; add a line for each to HELP in tpp_jax/config_help.py, "
                       f"then run `{REGENERATE}`.")
  stale = sorted(set(config_help.HELP) - leaves)
  assert not stale, f"HELP in tpp_jax/config_help.py names fields base_config() lacks: {stale}; remove or rename them."
  for name, text in config_help.HELP.items():
    assert text.strip() and "\n" not in text and len(text) <= 110, f"HELP[{name!r}]: one short line (<= 110 chars)."


def test_fields_lists_every_leaf_once_with_its_default():
  rows = config_help.fields()
  names = [name for name, _, _ in rows]
  assert len(names) == len(set(names)) == len(config_help.HELP)
  assert names == list(config_help.HELP)  # schema order
  config = config_lib.base_config()
  for name, default, text in rows:
    node = config
    for part in name.split("."):
      node = node[part]
    assert default == node, name
    assert text == config_help.HELP[name]


def test_docs_config_md_is_current():
  assert DOCS.is_file(), f"{DOCS} is missing; generate it with `{REGENERATE}`."
  assert DOCS.read_text() == config_help.markdown(), (
      f"docs/config.md is out of date with tpp_jax/config_help.py / base_config(); regenerate it with `{REGENERATE}`.")


def test_markdown_has_a_table_row_per_field():
  md = config_help.markdown()
  assert REGENERATE in md
  for name, _, _ in config_help.fields():
    assert f"| `{name}` |" in md, name


def test_text_help_mentions_every_field_and_its_default():
  text = config_help.text_help()
  assert text.startswith("usage: python -m tpp_jax.main --config configs/NAME.py")
  lines = text.splitlines()
  for name, default, _ in config_help.fields():
    prefix = f"  {name} = {config_help.format_value(default)} "
    assert any(line.startswith(prefix) for line in lines), f"text_help() has no line starting {prefix!r}"


def test_config_help_reads_no_field():
  """tests/test_config_schema.py counts a field-name string or attribute anywhere in tpp_jax as a read of that field:
  config_help.py, which names every field, must count as reading none (its table is one multi-line string)."""
  names = names_read(pathlib.Path(config_help.__file__).read_text())  # the schema test's own reader
  leaves = _leaf_names(config_lib.base_config())
  fields = set(leaves) | {name.rsplit(".", 1)[-1] for name in leaves}
  assert not names & fields, f"tpp_jax/config_help.py reads {sorted(names & fields)} as test_config_schema sees it."
