"""Objectives: pretext tasks (MAE, DINO) and downstream tasks (classification, segmentation)."""
from __future__ import annotations


def make_objective(config, encoder):
  """The objective a stage trains: config.pretext.type or config.task.type, as stages.STAGES says."""
  from tpp_jax import stages
  kind = stages.get(config.stage).objective_kind(config)
  if kind == "mae":
    from tpp_jax.objectives.mae import MAEObjective as cls
  elif kind == "dino":
    from tpp_jax.objectives.dino import DINOObjective as cls
  elif kind == "contrastive":
    from tpp_jax.objectives.contrastive import ContrastiveObjective as cls
  elif kind == "classification":
    from tpp_jax.objectives.classification import ClassificationObjective as cls
  elif kind == "segmentation":
    from tpp_jax.objectives.segmentation import SegmentationObjective as cls
  else:
    raise ValueError(f"No objective {kind!r}.")
  return cls(config, encoder)
