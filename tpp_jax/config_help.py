"""One line of help for every config field: the source of `python -m tpp_jax.main --help` and docs/config.md.

  HELP         dotted field name ('data.augment.hflip') -> what it does, for every leaf of config.base_config()
  fields()     (dotted name, default, help) in schema order
  text_help()  the `--help` text: usage, then the fields grouped by top-level block
  markdown()   docs/config.md: one table per top-level block

Regenerate the docs after changing a field or its help: `python -m tpp_jax.config_help > docs/config.md`
(tests/test_config_help.py fails while a field lacks help or the file is out of date).
"""
from __future__ import annotations

import re

import ml_collections as mlc  # what tpp_jax.config is built on; no jax here beyond what tpp_jax.config imports

from tpp_jax import config as config_lib

# One line of help per field, in the order base_config() defines them (top-level fields first): `NAME  help`; a line
# starting with spaces continues the one above, `[block] text` starts a top-level group, {STAGES}-style names are
# the choice lists of tpp_jax.config. (A table, not a dict literal: tests/test_config_schema.py counts every
# field-name string in the package as a read of that field, and this file reads none.)
_TABLE = """\
[top level] the run: stage, seeds, training loop, evaluation, checkpoints
stage  what to run: {STAGES} (tpp_jax/stages.py)
seed  random seed of init, data order and label subsets; stage pipeline: the first seed
seeds  stage pipeline: the number of seeds run (seed, seed+1, ..., seed+seeds-1)
steps  optimizer steps to train (replaced when epochs > 0)
epochs  > 0: train ceil(epochs x train examples / batch_size) steps instead of `steps`; 0 = use steps
batch_size  global training batch size (split over the processes)
eval_every  evaluate the val split (and keep best/) every N steps; 0 = only at the end of training
eval_batch_size  global evaluation batch size
log_every  log training metrics (metrics.jsonl, TensorBoard, progress bar) every N steps
checkpoint_every  save a checkpoint every N steps; 0 = only at the end (and when stopped)
stop_after  stop with a checkpoint after this step; rerunning the command resumes (0 = off)
patience  stop (converged) after this many evaluations in a row without a new best val metric; steps = cap (0 = off)
keep_checkpoints  how many of the newest checkpoints DIR/checkpoints keeps (best/ is kept apart)
best_metric  val metric that picks the best/ checkpoint, e.g. 'auc' or 'dice'; '' = the objective's default
train_extra  regexes of frozen backbone leaves to train too (stages finetune / tpp)
target_init  a TPP workdir whose target parameters start the fine-tune (stage finetune only)
eval_splits  splits evaluated during and at the end of training, and by stage eval
eval_checkpoint  stage eval: latest | best (best falls back to latest when the run kept none)
progress  show progress bars (loss, images/s, ETA)
distributed  multi-host run: JAX_{COORDINATOR_ADDRESS,NUM_PROCESSES,PROCESS_ID} env or auto-detect
fsdp  shard large parameters and their optimizer state over the data axis (else replicated)
[model] the ViT backbone: architecture and numerics
model.variant  ViT size and patch: NAME/PATCH, NAME in Mu, Ti6, Ti, S, M, B, L, H (e.g. 'B/16')
model.image_size  input side in pixels, a multiple of the patch; must equal data.image_size
model.channels  input channels, 1 or 3; must equal data.channels
model.pooling  pooled image feature for the heads: cls (class token) | gap (mean of the patch tokens)
model.pos_emb  position embedding: learned | sincos (fixed 2D sin-cos as in MAE, never trained)
model.ln_eps  layer-norm epsilon; set it to the checkpoint's (HF ViT / ViTMAE 1e-12, timm / MAE / DINO 1e-6)
model.layer_scale  DINOv2-style LayerScale in every block (ls1, ls2)
model.drop_path  stochastic-depth rate of the last block (rising linearly from 0 over the blocks)
model.dropout  dropout rate after the embeddings and in every MLP
model.dtype  compute dtype: float32 | bfloat16 (trainable parameters stay float32)
model.attention  attention kernel: auto (cuDNN on GPU in bf16, else XLA) | xla | cudnn
model.remat  recompute block activations in the backward pass (memory for compute: large models, long inputs)
model.frozen_dtype  auto: frozen weight matrices stored in bf16 when dtype is bfloat16 | float32: keep them f32
[init] where the weights start
init.path  backbone weights: .pth / .safetensors / .npz file, HF folder or pretrain workdir; '' = random init
init.format  layout of init.path (auto: detected): {INIT_FORMATS}
init.load_decoder  MAE pretext (pretrain / tpp): start the decoder from init.path's decoder when it has one
init.adapter  adapter folder (tpp_jax.export --format adapter) whose target params and head start a finetune
[peft] the PEFT method whose new parameters are the targets
peft.type  PEFT method (the target parameters): {PEFT_TYPES}
peft.rank  LoRA / DoRA rank r
peft.alpha  LoRA / DoRA scale: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
peft.dropout  LoRA / DoRA dropout on the input of the low-rank path
peft.targets  LoRA / DoRA sites: comma list of q, k, v, o, fc1, fc2
peft.rslora  rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r
peft.adapter_dim  adapter / adaptformer: bottleneck width of the adapter modules
peft.adapter_scale  adaptformer: scale of the parallel adapter's output
peft.num_prompts  vpt: number of prompt tokens
peft.deep  vpt: new prompt tokens at every block (deep VPT) instead of at the input only
peft.prompt_dropout  vpt: dropout on the prompt tokens
[pretext] the self-supervised objective of stages pretrain / tpp (MAE, DINO, contrastive)
pretext.type  self-supervised objective of stages pretrain / tpp: {PRETEXTS}
pretext.mask_ratio  MAE: fraction of the patches masked, in (0, 1)
pretext.head  tpp: the pretext head train | frozen (kept as loaded from init.path) | auto (frozen when init.path has it)
pretext.norm_pix_loss  MAE: reconstruct per-patch normalised pixels
pretext.decoder_width  MAE decoder width (the decoder_* fields must fit init.path's decoder to load it)
pretext.decoder_depth  MAE decoder blocks
pretext.decoder_heads  MAE decoder attention heads
pretext.decoder_mlp_dim  MAE decoder MLP hidden size
pretext.dino_out_dim  DINO head: number of prototypes (output dimension)
pretext.dino_hidden_dim  DINO head: MLP hidden size
pretext.dino_bottleneck_dim  DINO head: L2-normalised bottleneck before the prototypes
pretext.teacher_momentum  DINO: teacher EMA momentum at the start, raised to 1 on a cosine schedule
pretext.teacher_temp  DINO: teacher softmax temperature (after the warm-up)
pretext.student_temp  DINO: student softmax temperature
pretext.center_momentum  DINO: EMA momentum of the teacher-output center (bias-corrected)
pretext.dino_batch_norm  DINO: standardise the pooled features over the batch before the head
pretext.local_crops  DINO multi-crop: local views per image (0 = the two global views only)
pretext.local_crop_size  DINO: side in pixels of the local views
pretext.local_crop_scale  DINO: area fractions (lo, hi) of the local crops
pretext.teacher_temp_warmup  DINO: teacher temperature at step 0, raised linearly to teacher_temp
pretext.teacher_temp_warmup_steps  DINO: steps of the teacher-temperature warm-up (0 = none)
pretext.contrastive_temp  contrastive: NT-Xent temperature
pretext.proj_hidden_dim  contrastive: projection head hidden size
pretext.proj_dim  contrastive: projection output dimension
[task] the labelled task of stages finetune / linear / full
task.type  downstream task of stages finetune / linear / full: {TASKS}
task.num_classes  number of classes, >= 2 (binary segmentation: 2)
task.label_smoothing  classification: label smoothing of the cross-entropy targets
task.class_weights  classification: weight the loss by inverse class frequency of the training labels
task.head  classification head: linear | bn_linear (affine-free BatchNorm + linear, as the MAE linear probe)
task.seg_decoder_dim  segmentation: channels of the UNETR-lite decoder
task.dice_weight  segmentation: loss = cross-entropy + dice_weight x soft Dice loss
[data] data source, preprocessing, augmentation and input pipeline
data.source  dataset reader: {SOURCES} (tpp_jax/data/sources.py)
data.path  the .npz file or data folder (not used by tfds)
data.image_size  square side images are resized to; must equal model.image_size
data.channels  1 (grey) or 3 (grey images are repeated); must equal model.channels
data.mean  normalisation (x/255 - mean) / std: 1 value (all channels) or one per channel
data.std  normalisation std, > 0: 1 value (all channels) or one per channel
data.augment.crop_scale  random-resized-crop area fractions (lo, hi); None = plain resize
data.augment.crop_ratio  random-resized-crop aspect-ratio range (lo, hi)
data.augment.hflip  random left-right flips
data.augment.vflip  random up-down flips
data.augment.rotate  random rotation up to this many degrees (0 = off)
data.augment.intensity  brightness / contrast jitter strength in [0, 1) (0 = off)
data.augment.on_device  crop, flips and normalisation in the jitted train step (the host ships uint8);
    needs rotate = intensity = 0
data.balance  class-balanced sampling of the training split
data.tfds_name  tfds: the dataset name
data.tfds_data_dir  tfds: the folder the dataset was prepared in ('' = the tfds default)
data.tfds_image_key  tfds: the feature holding the image
data.tfds_label_key  tfds: the feature holding the class label
data.tfds_mask_key  tfds: the feature holding the segmentation mask
data.tfds_splits  tfds: '' = the dataset's splits, or e.g. 'train=train[:90%],val=train[90%:]'
data.val_count  jpeg_npz: the last N images are the val split
data.max_train_examples  a fixed random subset of the training split (0 = all)
data.max_eval_examples  a fixed random subset of each eval split (0 = all)
data.label_fraction  labelled stages train on this stratified fraction of the train split (by seed); pipeline: per arm
data.workers  training-input processes: 'auto' | '0' (in-process) | 'N'
data.prefetch  batches the training iterator reads ahead (0 = none)
data.cache  decoded images in memory: auto (a split that fits 2 GiB) | on | off
data.window  (center, width) mapping DICOM / 16-bit / NIfTI values to 0..255; None = the file's window, else min..max
data.slice_axis  seg_folder NIfTI volumes: the axis cut into 2-D slices (0, 1, 2; -1 = the last)
data.skip_empty_slices  seg_folder NIfTI volumes: drop the slices whose mask has no foreground, in every split
[optim] the optimizer: AdamW with a warm-up cosine learning-rate schedule
optim.lr  peak learning rate (AdamW, linear warm-up then cosine decay)
optim.weight_decay  AdamW decoupled weight decay, on matrices only (leaves with ndim >= 2)
optim.b1  AdamW first-moment decay
optim.b2  AdamW second-moment decay
optim.clip_norm  clip gradients to this global norm (0 = off)
optim.max_param_norm  divergence guard: stop, saving nothing more, when trainable params' L2 norm passes it (0 = off)
optim.warmup_steps  steps of the linear learning-rate warm-up from 0
optim.min_lr_ratio  learning rate at the end of the cosine decay, as a fraction of lr
optim.layer_decay  layer-wise lr decay in (0, 1] (BEiT / MAE fine-tuning); 1.0 = off
[pipeline] stage pipeline: the TPP arm, the fine-tune from it and the plain-PEFT baseline(s)
pipeline.tpp_steps  steps of the TPP arm
pipeline.tpp_lr  optim.lr of the TPP arm
pipeline.tpp_batch_size  batch_size of the TPP arm
pipeline.report  write DIR/report.md and comparison.json when every arm is done
pipeline.label_fractions  fine-tune arms run once per labelled fraction F of the train split (F < 1: frac_F/)
pipeline.compute_matched  add arm baseline_matched: the baseline trained tpp_steps + steps steps
pipeline.brackets  add arms linear (task head only) and full (backbone + head), as the baseline otherwise
pipeline.full_lr  optim.lr of the full fine-tune bracket (0 = the baseline's optim.lr)
pipeline.budget  fixed (every labelled arm trains `steps`) | converged (each stops by pipeline.patience, cap `steps`)
pipeline.patience  budget=converged: evaluations without a new best before a labelled arm stops
pipeline.controls_from  a pipeline workdir whose control arms (baseline, linear, full, ...) this one reuses
"""

_CHOICES = dict(STAGES=config_lib.STAGES, INIT_FORMATS=config_lib.INIT_FORMATS, PEFT_TYPES=config_lib.PEFT_TYPES,
                PRETEXTS=config_lib.PRETEXTS, TASKS=config_lib.TASKS, SOURCES=config_lib.SOURCES)


def _parse(table: str) -> tuple[dict[str, str], dict[str, str]]:
  """_TABLE -> (HELP, GROUPS); GROUPS maps a top-level block ('' for the fields outside blocks) to its title."""
  help_, groups, name = {}, {}, None
  for line in table.splitlines():
    if not line.strip():
      continue
    if line.startswith("["):
      block, _, text = line[1:].partition("]")
      groups["" if block == "top level" else block] = text.strip()
    elif line[0].isspace():
      help_[name] += " " + line.strip()
    else:
      name, _, text = line.partition(" ")
      if name in help_:
        raise ValueError(f"config_help: {name} has two help lines")
      help_[name] = text.strip()
  expand = lambda m: " | ".join(_CHOICES[m[1]]) if m[1] in _CHOICES else m[0]
  return {k: re.sub(r"\{([A-Z_]+)\}", expand, v) for k, v in help_.items()}, groups


# HELP: dotted field name ('data.augment.hflip') -> one line of help, for every leaf of base_config(), schema order.
# GROUPS: top-level block -> what it holds; the fields outside any block ('') first, then the blocks in schema order.
HELP: dict[str, str]
GROUPS: dict[str, str]
HELP, GROUPS = _parse(_TABLE)

USAGE = """\
usage: python -m tpp_jax.main --config configs/NAME.py[:PRESETS,key=value] [--workdir DIR] [--config.FIELD=VALUE ...]

Runs the config's stage in the workdir DIR. configs/NAME.py defines get_config(arg), usually base_config() plus
changes (a configs/NAME.py missing here is the installed copy); :ARG is a comma list of its presets
and dotted overrides (configs/default.py:seeds=5). --config.FIELD=VALUE overrides one field below with a Python
literal (else a string), e.g. --config.peft.rank=4 --config.data.cache=off. An unknown field is an error.
"""


def _leaves(node: mlc.ConfigDict, prefix: str = ""):
  for key, value in node.items():
    if isinstance(value, mlc.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def fields(config: mlc.ConfigDict | None = None) -> list[tuple[str, object, str]]:
  """(dotted name, value, help) of every leaf of `config` (default: base_config()), in schema order.

  A leaf HELP does not know comes after the known ones, with help ''.
  """
  config = config_lib.base_config() if config is None else config
  order = {name: i for i, name in enumerate(HELP)}
  leaves = sorted(_leaves(config), key=lambda kv: order.get(kv[0], len(order)))
  return [(name, value, HELP.get(name, "")) for name, value in leaves]


def format_value(value) -> str:
  """A field value as it reads in a config (floats with long expansions to 6 significant digits)."""
  if isinstance(value, float) and not isinstance(value, bool) and len(repr(value)) > 8:
    return f"{value:.6g}"
  if isinstance(value, (tuple, list)):
    items = ", ".join(format_value(v) for v in value)
    if isinstance(value, list):
      return f"[{items}]"
    return f"({items},)" if len(value) == 1 else f"({items})"
  return repr(value)


def _group(name: str) -> str:
  return name.split(".")[0] if "." in name else ""


def _grouped(config=None) -> list[tuple[str, list[tuple[str, object, str]]]]:
  groups: dict[str, list] = {g: [] for g in GROUPS}
  for row in fields(config):
    groups.setdefault(_group(row[0]), []).append(row)
  return [(g, rows) for g, rows in groups.items() if rows]


def _title(group: str) -> str:
  return "top level" if group == "" else group


def text_help(config: mlc.ConfigDict | None = None) -> str:
  """The `--help` text: usage, then every field as `  name = default   help`, grouped by top-level block.

  The defaults are base_config()'s, or `config`'s values when given.
  """
  where = "defaults (base_config(); a config file may change them)" if config is None else "values in this config"
  lines = [USAGE, f"Fields and their {where}:"]
  for group, rows in _grouped(config):
    lines += ["", f"{_title(group)}: {GROUPS.get(group, '')}".rstrip(": ")]
    cells = [(name, format_value(value), text) for name, value, text in rows]
    width = max(len(f"{name} = {value}") for name, value, _ in cells)
    lines += [f"  {f'{name} = {value}':<{width}}   {text}".rstrip() for name, value, text in cells]
  return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def markdown() -> str:
  """docs/config.md: one table (field | default | meaning) per top-level block of base_config()."""
  out = ["# Config fields", "",
         "Every field of `tpp_jax.config.base_config()`, its default and its meaning; generated by "
         "`python -m tpp_jax.config_help > docs/config.md` from `tpp_jax/config_help.py` (do not edit by hand).",
         "Override one with `--config.FIELD=VALUE`, e.g. `--config.peft.rank=4`."]
  for group, rows in _grouped():
    out += ["", f"## {'Top level' if group == '' else f'`{group}`'}", ""]
    if GROUPS.get(group):
      out += [GROUPS[group][0].upper() + GROUPS[group][1:] + ".", ""]
    out += ["| field | default | meaning |", "|---|---|---|"]
    out += [f"| `{name}` | `{_cell(format_value(value))}` | {_cell(text)} |" for name, value, text in rows]
  return "\n".join(out) + "\n"


if __name__ == "__main__":
  print(markdown(), end="")
