"""Collecting run folders (those with summary.json) into records: one dict per run, sorted in report order."""
from __future__ import annotations

import os
import pathlib
import re
from typing import Iterable, Sequence

from tpp_jax import stages
from tpp_jax.jsonio import read_json, read_jsonl

PRETEXT_STAGES = ("pretrain", "tpp")
ARM_ORDER = ("tpp_finetune", "baseline", "baseline_matched", "linear", "full", "tpp")


class NoRunsError(ValueError):
  """A folder given to the report holds no run folder (no summary.json beneath it)."""


def _get(cfg: dict, dotted: str, default=None):
  """cfg['a']['b'] for 'a.b', or default."""
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return default
    node = node[part]
  return node


def _seed_of(path: pathlib.Path, cfg: dict) -> int | None:
  seed = _get(cfg, "seed")
  if seed is not None:
    return int(seed)
  for part in reversed(path.parts):
    m = re.fullmatch(r"seed_(\d+)", part)
    if m:
      return int(m.group(1))
  return None


def _role(arm: str, stage: str, has_target_init: bool) -> str:
  """What a run is in the comparison: tpp | tpp_finetune | baseline | baseline_matched | linear | full | other."""
  if arm in ARM_ORDER:
    return arm
  if stage == "tpp":
    return "tpp"
  if stage == "finetune":
    return "tpp_finetune" if has_target_init else "baseline"
  return "other"


def _peft_of(stage: str, cfg: dict) -> str:
  """peft.type of a run; 'none' for a stage built without PEFT parameters (linear, full, pretrain)."""
  entry = stages.STAGES.get(stage)
  return "none" if entry is not None and entry.trains and not entry.peft else str(_get(cfg, "peft.type", "none"))


def _record(run: pathlib.Path) -> dict:
  summary = read_json(run / "summary.json")
  cfg_path = run / "config.json"
  cfg = read_json(cfg_path) if cfg_path.exists() else (summary.get("config") or {})
  stage = str(summary.get("stage") or _get(cfg, "stage", ""))
  target_init = summary.get("target_init")
  has_ti = bool(target_init) or bool(_get(cfg, "target_init", ""))
  arm = run.name
  fraction = float(_get(cfg, "data.label_fraction", 1.0) or 1.0) if stage not in PRETEXT_STAGES else 1.0
  return {
      "path": str(run), "arm": arm, "role": _role(arm, stage, has_ti),
      "seed": _seed_of(run, cfg), "stage": stage, "fraction": fraction,
      "train_examples": (summary.get("data") or {}).get("train_examples"),
      "peft": _peft_of(stage, cfg), "task": str(_get(cfg, "task.type", "classification")),
      "pretext": str(_get(cfg, "pretext.type", "")), "config": cfg,
      "final": summary.get("final") or {}, "best": summary.get("best"), "best_final": summary.get("best_final") or {},
      "params": summary.get("params") or {}, "steps": summary.get("steps", _get(cfg, "steps")),
      "converged_at": summary.get("converged_at"),
      "init": summary.get("init"), "target_init": target_init,
      "images_per_sec": summary.get("images_per_sec"), "wall_time_s": summary.get("wall_time_s"),
      "rows": read_jsonl(run / "metrics.jsonl"),
  }


def _arm_rank(arm: str) -> tuple:
  return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


def collect(run_dirs: Iterable) -> list[dict]:
  """Records of every run folder (with summary.json) under `run_dirs`, searched recursively.

  Args:
    run_dirs: folders (a pipeline folder, run folders, or parents of them).

  Returns:
    One dict per run: path, arm (folder name: tpp_finetune / baseline / baseline_matched / linear / full / tpp /
    other), role,
    seed, stage, fraction (data.label_fraction: the labelled fraction of the train split, 1.0 for pretext runs),
    train_examples (summary.json data.train_examples, None before it was recorded), peft, task, pretext, config,
    final ({split: metrics}), best ({step, metric, value} or None), best_final ({split: metrics} of the best
    checkpoint; {} when none was kept or the summary predates it), params, steps, converged_at (the step patience
    stopped at, else None), init, target_init, images_per_sec, wall_time_s and rows (metrics.jsonl). Sorted by arm
    then seed; a run reached twice is listed once.
  """
  if isinstance(run_dirs, (str, os.PathLike)):
    run_dirs = [run_dirs]
  seen, records = set(), []
  for d in run_dirs:
    d = pathlib.Path(d)
    if not d.exists():
      raise FileNotFoundError(f"{d} does not exist.")
    found = [d / "summary.json"] if (d / "summary.json").exists() else []
    found += sorted(pathlib.Path(root) / "summary.json" for root, _, files in os.walk(d, followlinks=True)
                    if "summary.json" in files and pathlib.Path(root) != d)  # (links: pipeline.controls_from)
    for s in found:
      run = s.parent.resolve()
      if run not in seen:
        seen.add(run)
        records.append(_record(run))
  records.sort(key=lambda r: (-r["fraction"], _arm_rank(r["arm"]), r["peft"], -1 if r["seed"] is None else r["seed"],
                              r["path"]))
  return records


def _groups(records: Sequence[dict]) -> dict:
  """{(arm, peft, task, fraction): [records]} in report order (largest labelled fraction first)."""
  out: dict = {}
  for r in sorted(records, key=lambda r: (-r["fraction"], _arm_rank(r["arm"]), r["peft"], r["task"])):
    out.setdefault((r["arm"], r["peft"], r["task"], r["fraction"]), []).append(r)
  return out
