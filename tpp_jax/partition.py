"""Parameter partition: ordered (regex, label) rules over '/'-joined paths -> optax.multi_transform.

Labels:
  frozen    not trained (optax.set_to_zero, no optimizer state)
  target    PEFT ("target") parameters: trained in `tpp` and `finetune`
  head      pretext head (MAE decoder, DINO head) or task head
  backbone  backbone weights trained in `pretrain` / `full`

The top level of the parameter tree is {'encoder': ViT, 'decoder' | 'dino_head' | 'head': ...}.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import jax
import numpy as np
import optax

from tpp_jax import stages as stages_lib
from tpp_jax import tree as tree_lib
from tpp_jax.stages import FIXED_POS_RE, TARGET_RE  # noqa: F401 (re-exported)

LABELS = ("frozen", "target", "head", "backbone")
STAGES_TRAIN = tuple(n for n, s in stages_lib.STAGES.items() if s.trains)  # the built-in ones; see stages.STAGES

Rules = Sequence[tuple[str, str]]


def default_rules(stage: str, peft_type: str = "none", fixed_pos_emb: bool = False,
                  train_extra: Iterable[str] = ()) -> list[tuple[str, str]]:
  """The partition of a stage (stages.STAGES[stage].rules). `train_extra`: regexes of backbone leaves to train too."""
  entry = stages_lib.STAGES.get(stage)
  if entry is None or not entry.trains:
    trainable = [n for n, s in stages_lib.STAGES.items() if s.trains]
    raise ValueError(f"No partition for stage {stage!r}; trainable stages are {trainable}.")
  return entry.rules(peft_type, fixed_pos_emb=fixed_pos_emb, train_extra=train_extra)


def label_tree(params, rules: Rules):
  """Same-structure tree of labels; the first matching rule wins; an unmatched leaf is an error."""
  compiled = [(re.compile(rx), lab) for rx, lab in rules]
  for _, lab in rules:
    if lab not in LABELS:
      raise ValueError(f"Partition label {lab!r} is not one of {LABELS}.")

  def label(path, _):
    p = tree_lib.path_str(path)
    for rx, lab in compiled:
      if rx.search(p):
        return lab
    raise ValueError(f"Parameter {p!r} matches no partition rule; add a (regex, label) rule for it. "
                     f"Rules: {[rx for rx, _ in rules]}")

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(labels, tx_trainable: optax.GradientTransformation) -> optax.GradientTransformation:
  """One optimizer for every trainable label, set_to_zero for frozen (no state for frozen leaves)."""
  present = set(jax.tree_util.tree_leaves(labels))
  # in LABELS' order, not the set's: a set of strings iterates in an order that changes from process to process
  # (PYTHONHASHSEED), and with it the order multi_transform traces its groups -- the train step's HLO then differed
  # between two runs of one command (its ops in another order: another program for XLA, no compile-cache hit)
  transforms = {lab: (optax.set_to_zero() if lab == "frozen" else tx_trainable) for lab in LABELS if lab in present}
  return optax.multi_transform(transforms, labels)


def param_counts(params, labels) -> dict[str, int]:
  """{'total', 'trainable', 'target', 'head', 'backbone', 'frozen'} parameter counts."""
  counts = {lab: 0 for lab in LABELS}
  for leaf, lab in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels)):
    counts[lab] += int(np.prod(np.shape(leaf)))
  total = sum(counts.values())
  return {"total": total, "trainable": total - counts["frozen"], **counts}


def format_counts(c: dict[str, int]) -> str:
  """Like peft's print_trainable_parameters()."""
  pct = 100.0 * c["trainable"] / max(c["total"], 1)
  return (f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {pct:.4f} "
          f"(target {c['target']:,}, head {c['head']:,}, backbone {c['backbone']:,})")


def subtree(params, labels, keep: str):
  """Nested dict holding only the leaves labelled `keep` (e.g. the target parameters)."""
  def visit(p, l):
    if isinstance(p, dict):
      out = {k: visit(p[k], l[k]) for k in p}
      return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
    return p if l == keep else None
  return visit(dict(params), dict(labels)) or {}
