"""Parameter-tree helpers, on flax.traverse_util: the one home for flat names of nested params.

  flatten(tree)       {'encoder': {'blocks_0': {...}}} -> {'encoder/blocks_0/...': leaf}
  unflatten(flat)     the inverse
  path_str(path)      a jax key path (tree_flatten_with_path) -> 'encoder/blocks_0/...'
  leaf_paths(tree)    path_str of every leaf, in jax's leaf order
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import traverse_util


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
  """Nested dict -> {prefix + 'a/b/c': leaf} (leaves as they are; empty sub-dicts dropped)."""
  return {prefix + k: v for k, v in traverse_util.flatten_dict(tree, sep=sep).items()}


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep=sep)


def path_str(path) -> str:
  """A jax key path -> 'a/b/c' (dict keys, attribute names or sequence indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaf_paths(tree) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
