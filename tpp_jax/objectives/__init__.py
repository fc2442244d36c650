"""Objectives: pretext tasks (MAE, DINO) and downstream tasks (classification, segmentation)."""
from __future__ import annotations


def make_objective(config, encoder):
  """The objective a stage trains: the pretext for pretrain/tpp, the task otherwise."""
  if config.stage in ("pretrain", "tpp"):
    kind = config.pretext.type
  else:
    kind = config.task.type
  if kind == "mae":
    from tpp_jax.objectives.mae import MAEObjective as cls
  elif kind == "dino":
    from tpp_jax.objectives.dino import DINOObjective as cls
  elif kind == "classification":
    from tpp_jax.objectives.classification import ClassificationObjective as cls
  elif kind == "segmentation":
    from tpp_jax.objectives.segmentation import SegmentationObjective as cls
  else:
    raise ValueError(f"No objective {kind!r}.")
  return cls(config, encoder)
