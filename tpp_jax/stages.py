"""What each `config.stage` means, declared once. Adding a stage = one entry in STAGES.

The engine (model, partition, objective, init loading, best checkpoint), objectives.make_objective,
partition.default_rules, checkpoints.load.wants_decoder and pipeline.arm_configs read this table.
This module imports nothing from tpp_jax, so any module (config.py included) may import it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

# Leaves added by PEFT methods (see models/peft.py).
TARGET_RE = (r"^encoder/(.*/)?(lora_a|lora_b|dora_m|ssf_scale|ssf_shift|prompts)$"
             r"|^encoder/.*/(adapter_attn|adapter_mlp|adaptformer)/")
BITFIT_RE = r"^encoder/.*/bias$"  # peft.type='bitfit': the backbone's biases are the target parameters
FIXED_POS_RE = r"^(encoder|decoder)/pos_embed$"  # sin-cos position embeddings stay fixed (MAE)
PRETEXT_HEADS = r"^(decoder|dino_head|proj_head)/"
TASK_HEAD = r"^head/"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One sub-run of a comparison stage: DIR/seed_S/NAME runs `stage`, target_init from arm `target_from`.

  An arm whose stage needs labels runs once per pipeline.label_fractions entry F (F < 1: DIR/seed_S/frac_F/NAME,
  on the stratified fraction F of the train split); the others run once per seed on all training images.
  """
  name: str
  stage: str
  target_from: str = ""
  plus_steps: str = ""  # dotted config field added to `steps` (compute-matched: 'pipeline.tpp_steps')
  only_if: str = ""     # dotted bool config field; the arm runs only when it is true
  overrides: tuple[tuple[str, object], ...] = ()  # (dotted field, value) pairs set in the arm's config
  lr: str = ""          # dotted config field holding the arm's optim.lr (0 there: the pipeline's optim.lr)


def fraction_dir(fraction: float) -> str:
  """The folder of a labelled fraction's arms under DIR/seed_S: 'frac_0.05'; '' for 1.0 (the seed folder)."""
  return "" if float(fraction) >= 1.0 else f"frac_{float(fraction):.6g}"


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its partition, objective, what is loaded at init and what is written."""
  name: str
  doc: str
  trains: bool = True          # a training stage (engine.Trainer); eval / pipeline are not
  peft: bool = False           # the model has PEFT (target) parameters; else peft.type is forced to 'none'
  objective: str = ""          # 'pretext' (config.pretext.type) | 'task' (config.task.type) | '' (none)
  encoder: str = "frozen"      # label of the backbone leaves no earlier rule claims: 'frozen' | 'backbone'
  heads: str = TASK_HEAD       # regex of the objective's own parameters (decoder / DINO head / task head)
  heads_label: str = "head"    # their label
  rest: str | None = None      # label of leaves no rule matches (None: such a leaf is an error)
  needs_labels: bool = False   # the data must have labels / masks (task.num_classes is used)
  loads_decoder: bool = False  # an MAE pretext may start its decoder from init.path's decoder
  target_init: bool = False    # target_init / init.adapter may be set
  keeps_best: bool = True      # writes best/ (the best val checkpoint by best_metric)
  writes: str = ""             # what the run leaves (for docs and messages)
  arms: tuple[Arm, ...] = ()   # comparison stages: the sub-runs of each seed

  def rules(self, peft_type: str = "none", fixed_pos_emb: bool = False,
            train_extra: Iterable[str] = (), pretext_head: str = "train") -> list[tuple[str, str]]:
    """Ordered (regex, label) partition rules; the first match wins (partition.label_tree). `pretext_head`
    'frozen': a PEFT stage's pretext head (loaded pre-trained) stays frozen: only the target parameters train."""
    if not self.trains:
      raise ValueError(f"Stage {self.name!r} trains nothing and has no partition.")
    if pretext_head not in ("train", "frozen"):
      raise ValueError(f"pretext.head={pretext_head!r} must be resolved to 'train' or 'frozen' first "
                       "(checkpoints/load.resolve_pretext_head).")
    rules: list[tuple[str, str]] = [(FIXED_POS_RE, "frozen")] if fixed_pos_emb else []
    if self.encoder != "frozen":
      rules.append((r"^encoder/", self.encoder))
    frozen_head = pretext_head == "frozen" and self.peft and self.objective == "pretext"
    rules.append((self.heads, "frozen" if frozen_head else self.heads_label))
    if self.peft:
      rules.append((TARGET_RE, "target"))
      if peft_type == "bitfit":
        rules.append((BITFIT_RE, "target"))
    if self.encoder == "frozen":  # train_extra: backbone leaves to train too (all train already otherwise)
      rules += [(rx, "target") for rx in train_extra]
    rules.append((r"^encoder/", "frozen"))
    if self.rest is not None:
      rules.append((r".*", self.rest))
    return rules

  def peft_type(self, config) -> str:
    """The PEFT type the model of this stage is built with."""
    return str(config.peft.type) if self.peft else "none"

  def objective_kind(self, config) -> str:
    """The objective module name: config.pretext.type or config.task.type."""
    if self.objective == "pretext":
      return str(config.pretext.type)
    if self.objective == "task":
      return str(config.task.type)
    raise ValueError(f"Stage {self.name!r} has no objective.")


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", "stage 0: the whole backbone and the pretext head (MAE / DINO) from scratch or init.path",
          objective="pretext", encoder="backbone", heads=r"^(decoder|head|dino_head|proj_head)/",
          heads_label="backbone",
          rest="frozen", loads_decoder=True, writes="a backbone checkpoint (export_backbone)"),
    Stage("tpp", "target parameter pre-training: PEFT params + pretext head on a frozen backbone",
          peft=True, objective="pretext", heads=PRETEXT_HEADS, loads_decoder=True,
          writes="the target parameters (target_init of a finetune run)"),
    Stage("finetune", "PEFT fine-tuning: target params (+ train_extra) + task head on a frozen backbone",
          peft=True, objective="task", needs_labels=True, target_init=True, writes="a task model + metrics"),
    Stage("linear", "linear probe: the task head only", objective="task", needs_labels=True,
          writes="a linear-probe baseline"),
    Stage("full", "full fine-tuning: backbone + task head", objective="task", encoder="backbone",
          heads=r"^(decoder|head|dino_head)/", rest="frozen",
          needs_labels=True, writes="a full fine-tune baseline"),
    Stage("eval", "metrics of a saved run (its own config.json and checkpoint)", trains=False, keeps_best=False,
          writes="RUN/eval.json"),
    Stage("pipeline", "tpp then finetune from it, and the finetune baseline, same seeds and budget (+ the "
          "compute-matched baseline, the linear-probe / full fine-tune brackets when asked)",
          trains=False, keeps_best=False, writes="DIR/report.md + figures",
          arms=(Arm("tpp", "tpp"), Arm("tpp_finetune", "finetune", target_from="tpp"), Arm("baseline", "finetune"),
                Arm("baseline_matched", "finetune", plus_steps="pipeline.tpp_steps",
                    only_if="pipeline.compute_matched"),
                # brackets: the same backbone, data, steps, optimizer and seed as `baseline`; the head alone (below)
                # and everything (above). train_extra is cleared: the linear probe trains the task head only.
                Arm("linear", "linear", only_if="pipeline.brackets", overrides=(("train_extra", ()),)),
                Arm("full", "full", only_if="pipeline.brackets", lr="pipeline.full_lr"))),
)}


def get(name: str) -> Stage:
  """The stage called `name`; ValueError naming the valid ones."""
  if name not in STAGES:
    raise ValueError(f"stage={name!r} is not valid; choose one of {list(STAGES)}.")
  return STAGES[name]


def training(name: str) -> Stage:
  """The training stage called `name`; ValueError for eval / pipeline / unknown names."""
  stage = get(name)
  if not stage.trains:
    raise ValueError(f"stage {name!r} is not a training stage; trainable stages are "
                     f"{[n for n, s in STAGES.items() if s.trains]}.")
  return stage


def rules_for(config) -> list[tuple[str, str]]:
  """The partition rules of `config` (its stage, peft type, pos-emb and train_extra)."""
  stage = training(config.stage)
  head = config.pretext.get("head", "train") if stage.peft and stage.objective == "pretext" else "train"
  return stage.rules(stage.peft_type(config), fixed_pos_emb=config.model.pos_emb == "sincos",
                     train_extra=tuple(config.get("train_extra", ()) or ()), pretext_head=head)
