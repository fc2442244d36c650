"""Export a trained run for use elsewhere.

  python -m tpp_jax.export RUN OUT --format adapter|peft|merged [--checkpoint best|latest]

  adapter  OUT/adapter.safetensors + adapter_config.json: the target (PEFT) parameters, the task head and the
           config that made them (any PEFT type). Start a run from it with --config.init.adapter=OUT (target
           params + task head) or --config.target_init=OUT (target params only).
  peft     OUT/adapter_model.safetensors + adapter_config.json (+ README.md) in Hugging Face peft's LoRA format,
           for LoRA / DoRA / rsLoRA runs on a Hugging Face ViT backbone. A classification run's adapter holds its
           head as peft's modules_to_save=["classifier"] (+ preprocessor_config.json): PeftModel.from_pretrained(
           ViTForImageClassification.from_pretrained(init.path folder, num_labels=K), OUT); other runs attach to
           ViTModel.from_pretrained(init.path folder). Also loads back as --config.target_init=OUT.
  merged   LoRA / DoRA / SSF folded into the backbone, a model transformers runs without tpp_jax or peft. A
           classification run: OUT/model.safetensors + config.json + preprocessor_config.json of a
           ViTForImageClassification (class-token pooling) whose labels are the run's classes and whose image
           processor is the run's eval transform: transformers.pipeline("image-classification", model=OUT). A run
           without a task head (tpp, pretrain): a plain ViTModel (ViTModel.from_pretrained(OUT)).

OUT must be new or empty: nothing is ever overwritten or deleted. Errors print `error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

from tpp_jax import config as config_lib
from tpp_jax.jsonio import read_json, write_atomic

FORMATS = ("adapter", "peft", "merged")
TASK_STAGES = ("finetune", "linear", "full")  # the stages that train a task head
PROCESSOR_FILE = "preprocessor_config.json"  # transformers' image processor of a ViTForImageClassification
LORA_TYPES = ("lora", "dora")
UNMERGEABLE = ("adapter", "adaptformer", "vpt")


class ExportError(config_lib.ConfigError):
  """The export cannot be made as asked (the message names what would work)."""


# ------------------------------------------------------------------------------------------------
# Checks made from the run's config.json alone (before anything is read or written)
# ------------------------------------------------------------------------------------------------

def _has_target(config) -> bool:
  return config.stage in ("tpp", "finetune") and (config.peft.type != "none" or bool(config.train_extra))


def _classifies(config) -> bool:
  """A run with a classification head: exported as a transformers ViTForImageClassification."""
  return config.stage in TASK_STAGES and config.task.type == "classification"


def _check_classifier(config, fmt: str, what: str):
  """ViTForImageClassification classifies the final-normed class token: a run pooling otherwise has no such model."""
  if _classifies(config) and config.model.pooling != "cls":
    raise ExportError(f"--format {fmt} writes a transformers ViTForImageClassification, which classifies the class "
                      f"token, but {what} pools the patch tokens (model.pooling={config.model.pooling!r}); export it "
                      "with --format adapter.")


def check_format(config, fmt: str, run_dir) -> tuple[str | None, pathlib.Path | None]:
  """One ExportError when `fmt` does not apply to the run; -> (HF format of its backbone or None, weights file)."""
  from tpp_jax.checkpoints import adapter as adapter_lib
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt!r}; choose one of {list(FORMATS)}.")
  what = f"{run_dir} (stage {config.stage!r}, peft.type={config.peft.type!r})"
  if fmt in ("adapter", "peft") and not _has_target(config):
    raise ExportError(f"{what} has no target (PEFT) parameters, so there is no adapter to export; export the whole "
                      "model with --format merged.")
  hf_fmt, weights = adapter_lib.hf_format(str(config.init.path or ""), config.init.format)
  if fmt == "peft":
    ptype = config.peft.type
    if ptype not in LORA_TYPES or config.train_extra:
      extra = f" and train_extra={list(config.train_extra)}" if config.train_extra else ""
      raise ExportError(f"--format peft holds LoRA / DoRA / rsLoRA weights only, but {what}{extra} trained other "
                        "parameters; use --format adapter (any PEFT type, loads back into tpp_jax)"
                        + ("" if ptype in UNMERGEABLE else " or --format merged (a Hugging Face model)") + ".")
    if hf_fmt not in ("hf_vit", "hf_vit_mae"):
      init = str(config.init.path or "")
      why = ("was trained from random init" if not init or config.init.format == "none" else
             f"init.path={init!r} does not exist any more" if not pathlib.Path(init).expanduser().exists() else
             f"init.path={init!r} is {'a ' + hf_fmt + ' checkpoint' if hf_fmt else 'not a Hugging Face checkpoint'}")
      raise ExportError(f"--format peft needs a backbone that came from a Hugging Face ViTModel / ViTMAE checkpoint "
                        f"(the base model peft attaches to), but {run_dir}'s backbone {why}; use --format adapter, "
                        "or --format merged (a standalone Hugging Face model).")
    _check_classifier(config, fmt, what)
  if fmt == "merged":
    if config.stage in ("tpp", "finetune") and config.peft.type in UNMERGEABLE:
      raise ExportError(f"--format merged cannot fold peft.type={config.peft.type!r} into a Hugging Face ViTModel "
                        "(it adds modules ViTModel does not have; merging works for LoRA, DoRA, SSF, BitFit and "
                        "plain runs); export it with --format adapter.")
    if config.model.get("layer_scale", False):
      raise ExportError("--format merged writes a Hugging Face ViTModel, which has no LayerScale (model.layer_scale,"
                        " a Dinov2 backbone); export it with --format adapter.")
    if config.stage in TASK_STAGES and config.task.type != "classification":
      raise ExportError(f"--format merged writes a model transformers runs, but {what} is a {config.task.type} run "
                        "whose decoder has no transformers class; export it with --format adapter.")
    _check_classifier(config, fmt, what)
  return hf_fmt, weights


def check_out(out: pathlib.Path):
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ExportError(f"OUT={str(out)!r} already exists and is not an empty folder; give a new folder (nothing is "
                      "overwritten or deleted).")


# ------------------------------------------------------------------------------------------------
# The three formats
# ------------------------------------------------------------------------------------------------

def _labels(config, params):
  from tpp_jax import partition, stages
  return partition.label_tree(params, stages.rules_for(config))


def _head_leaves(run) -> tuple[dict, dict]:
  """Flat ('head/...', 'aux/...') leaves of a task head (stages finetune / linear / full), else empty."""
  from tpp_jax.checkpoints.hf_export import flatten
  if run.config.stage not in ("finetune", "linear", "full") or "head" not in run.params:
    return {}, {}
  return flatten(run.params["head"], "head/"), flatten(run.aux or {}, "aux/")


def _provenance(run) -> dict:
  c = run.config
  return {"stage": c.stage, "step": int(run.step), "checkpoint": run.checkpoint, "run_dir": str(run.run_dir),
          "peft": c.peft.to_dict(), "model": c.model.to_dict(), "task": c.task.to_dict(),
          "init": {"path": str(c.init.path or ""), "format": c.init.format},
          "data": {k: c.data.get(k) for k in ("image_size", "channels", "mean", "std")}}


def export_adapter(run, out: pathlib.Path) -> list[str]:
  from tpp_jax import partition
  from tpp_jax.checkpoints import adapter as adapter_lib
  from tpp_jax.checkpoints.hf_export import flatten
  target = flatten(partition.subtree(run.params, _labels(run.config, run.params), "target"))
  if not target:
    raise ExportError(f"{run.run_dir} has no target (PEFT) parameters; export the whole model with --format merged.")
  head, aux = _head_leaves(run)
  meta = {**_provenance(run), "target": sorted(target), "head": sorted(head), "aux": sorted(aux),
          "backbone_sha256": adapter_lib.backbone_fingerprint(run.params["encoder"], target),
          "config": json.loads(config_lib.to_json(run.config))}
  out.mkdir(parents=True, exist_ok=True)
  return adapter_lib.write_adapter(out, {**target, **head, **aux}, meta)


def _classifier(run) -> dict:
  """ViTForImageClassification's classifier.* of a classification run's head, else {}."""
  from tpp_jax.checkpoints import hf_export
  if not _classifies(run.config) or "head" not in run.params:
    return {}
  try:
    return hf_export.classifier_state_dict(run.params["head"], run.aux, run.config.task.head)
  except ValueError as e:
    raise ExportError(f"{e}; export it with --format adapter.") from None


def export_peft(run, out: pathlib.Path, hf_fmt: str, weights: pathlib.Path) -> list[str]:
  from safetensors.numpy import save_file

  from tpp_jax import partition
  from tpp_jax.checkpoints import adapter as adapter_lib
  from tpp_jax.checkpoints import hf_export
  target = partition.subtree(run.params, _labels(run.config, run.params), "target")
  try:
    tensors = adapter_lib.peft_state_dict(target.get("encoder", {}))
  except ValueError as e:
    raise ExportError(f"{e}; use --format adapter.") from None
  base = adapter_lib.hf_folder(str(run.config.init.path))
  base_class = "ViTMAEModel" if hf_fmt == "hf_vit_mae" else "ViTModel"
  head = _classifier(run) if hf_fmt == "hf_vit" else {}
  if _classifies(run.config) and not head:
    print(f"note: a ViTMAE base model has no image-classification class in transformers, so the task head is not "
          f"in {out}; --format merged writes a complete ViTForImageClassification.")
  names = []
  if head:  # the backbone is ViTForImageClassification.vit; the head is peft's modules_to_save "classifier"
    from tpp_jax.predict import class_names
    base_class, names = "ViTForImageClassification", class_names(run.config)
    prefix = "base_model.model."
    tensors = {prefix + "vit." + k[len(prefix):]: v for k, v in tensors.items()}
    tensors.update({prefix + k: v for k, v in head.items()})
  cfg = adapter_lib.peft_config_json(run.encoder.peft, str(base), base_class)
  if head:
    cfg["modules_to_save"] = ["classifier"]
  _peft_notes(run, base)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / adapter_lib.PEFT_WEIGHTS), metadata={"format": "pt"})
  write_atomic(out / adapter_lib.CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
  files = [adapter_lib.PEFT_WEIGHTS, adapter_lib.CONFIG_FILE]
  if head:
    proc = hf_export.image_processor_json(run.config.data, run.encoder.cfg.channels)  # the base's channels
    write_atomic(out / PROCESSOR_FILE, json.dumps(proc, indent=2) + "\n")
    files.append(PROCESSOR_FILE)
  write_atomic(out / "README.md", _peft_readme(run, out, base, base_class, names))
  return files + ["README.md"]


def _peft_readme(run, out: pathlib.Path, base: pathlib.Path, base_class: str, names: list[str]) -> str:
  p, c = run.encoder.peft, run.config
  size, out_s = run.encoder.cfg.image_size, str(out.absolute())
  text = (f"# {p.type.upper()}{' (rsLoRA)' if p.rslora else ''} adapter exported by tpp_jax\n\n"
          f"Base model: `{base}`, loaded as transformers.{base_class}. Trained by the `{c.stage}` run "
          f"`{run.run_dir}` (step {run.step}, {run.checkpoint} checkpoint); r={p.rank}, alpha={p.alpha}, "
          f"targets={list(p.targets)}.\n\n"
          "```python\nimport torch, transformers, peft\n")
  if base_class == "ViTForImageClassification":
    labels = {i: n for i, n in enumerate(names)}
    return text + (
        f"base = transformers.ViTForImageClassification.from_pretrained({str(base)!r}, num_labels={len(names)},\n"
        f"    id2label={labels!r}, label2id={ {n: i for i, n in labels.items()}!r})\n"
        f"model = peft.PeftModel.from_pretrained(base, {out_s!r}).eval()\n"
        f"processor = transformers.AutoImageProcessor.from_pretrained({out_s!r})  # the run's eval transform\n"
        'probs = model(**processor(images=[image], return_tensors="pt")).logits.softmax(-1)  # image: a PIL image\n'
        "```\n\n"
        "The task head is peft's `modules_to_save=[\"classifier\"]` (trained by tpp_jax, not initialised by peft); "
        "`model.merge_and_unload()` gives the plain ViTForImageClassification that `--format merged` writes, which "
        '`transformers.pipeline("image-classification", model=...)` runs.\n')
  head = ("" if c.stage not in TASK_STAGES else
          f"\nThe {c.task.type} head is not part of this peft adapter: export the run with `--format adapter` "
          "(tpp_jax) for it.\n")
  return text + (
      f"base = transformers.{base_class}.from_pretrained({str(base)!r})\n"
      f"model = peft.PeftModel.from_pretrained(base, {out_s!r}).eval()\n"
      f"images = torch.randn(2, {run.encoder.cfg.channels}, {size}, {size})  # normalised with data.mean/std = "
      f"{list(c.data.mean)}/{list(c.data.std)}\n"
      "tokens = model(pixel_values=images).last_hidden_state\n```\n" + head)


def _peft_notes(run, base: pathlib.Path):
  """Say where PyTorch would not reproduce our numbers exactly (fields the weights do not store)."""
  cfg_file = base / "config.json"
  if not cfg_file.is_file():
    print(f"note: {base} has no config.json; PeftModel needs a ViT base model that `from_pretrained` can load.")
    return
  hf = read_json(cfg_file, require_object=True)
  vit = run.encoder.cfg
  if hf.get("image_size", vit.image_size) != vit.image_size:
    print(f"note: the base model was made for {hf['image_size']} px and this run used {vit.image_size} px; call "
          "the PyTorch model with interpolate_pos_encoding=True.")
  if abs(float(hf.get("layer_norm_eps", vit.ln_eps)) - vit.ln_eps) > 0:
    print(f"note: the base config.json has layer_norm_eps={hf['layer_norm_eps']} but the run used "
          f"model.ln_eps={vit.ln_eps}; outputs will differ slightly.")


def export_merged(run, out: pathlib.Path, hf_fmt: str | None, weights: pathlib.Path | None) -> list[str]:
  from safetensors.numpy import save_file

  from tpp_jax.checkpoints import hf_export
  from tpp_jax.models.peft import merge
  try:
    sd = hf_export.vit_state_dict(merge(run.params["encoder"], run.encoder.peft))
  except ValueError as e:
    raise ExportError(f"--format merged: {e}; export it with --format adapter.") from None
  head = _classifier(run)
  base_cfg = {}
  if hf_fmt in ("hf_vit", "hf_vit_mae") and weights is not None:
    if not head:  # ViTForImageClassification has no pooler
      sd.update(_pooler(weights, run.encoder.cfg.width))
    cfg_file = weights.parent / "config.json"
    base_cfg = read_json(cfg_file, require_object=True) if cfg_file.is_file() else {}
  if head:
    from tpp_jax.predict import class_names
    sd = hf_export.grey_to_rgb_patch_embed({**sd, **head})
    cfg = hf_export.classifier_config_json(run.encoder.cfg, class_names(run.config), base_cfg)
  else:
    cfg = hf_export.vit_config_json(run.encoder.cfg, base_cfg)
  out.mkdir(parents=True, exist_ok=True)
  save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
  write_atomic(out / "config.json", json.dumps(cfg, indent=2) + "\n")
  if not head:
    return ["model.safetensors", "config.json"]
  write_atomic(out / PROCESSOR_FILE, json.dumps(hf_export.image_processor_json(run.config.data), indent=2) + "\n")
  return ["model.safetensors", "config.json", PROCESSOR_FILE]


def _pooler(weights: pathlib.Path, width: int) -> dict:
  """The base checkpoint's ViTModel pooler (not trained by us), so ViTModel.from_pretrained(OUT) has all weights."""
  if weights.suffix != ".safetensors":
    return {}
  from safetensors import safe_open
  out = {}
  with safe_open(str(weights), "np") as f:
    for k in f.keys():
      if k.startswith("pooler.dense.") and f.get_slice(k).get_shape()[-1] == width:
        out[k] = np.asarray(f.get_tensor(k), np.float32)
  return out


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------

def export(run_dir, out, fmt: str, checkpoint: str = "best") -> dict:
  """Export the run in `run_dir` to the new folder `out`; -> {'format', 'out', 'files', 'step', 'checkpoint'}."""
  from tpp_jax.checkpoints import restore
  out = pathlib.Path(out).expanduser().absolute()
  if checkpoint not in restore.CHECKPOINTS:
    raise ExportError(f"--checkpoint {checkpoint!r}; choose one of {list(restore.CHECKPOINTS)}.")
  config = config_lib.validate(restore.read_run_config(run_dir))
  hf_fmt, weights = check_format(config, fmt, pathlib.Path(run_dir))
  check_out(out)
  run = restore.load_run(run_dir, checkpoint)
  if fmt == "adapter":
    files = export_adapter(run, out)
  elif fmt == "peft":
    files = export_peft(run, out, hf_fmt, weights)
  else:
    files = export_merged(run, out, hf_fmt, weights)
  return {"format": fmt, "out": str(out), "files": files, "step": run.step, "checkpoint": run.checkpoint}


def disk_error(e: Exception) -> OSError | None:
  """The OSError of a failed write behind `e` (safetensors reports one as a SafetensorError), else None; a missing
  file is the user's mistake, reported as such."""
  if isinstance(e, FileNotFoundError):
    return None
  if isinstance(e, OSError):
    return e
  from tpp_jax.errors import as_os_error
  return as_os_error(e)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tpp_jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("run", help="the --workdir of a finished run")
  parser.add_argument("out", help="a new (or empty) folder to write")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--checkpoint", default="best", choices=("best", "latest"),
                      help="best (by the validation metric; falls back to latest) or latest")
  args = parser.parse_args(argv)
  try:
    res = export(args.run, args.out, args.format, args.checkpoint)
  except Exception as e:  # noqa: BLE001 - a user mistake or a disk failure is one line; anything else raises
    if os.environ.get("TPP_DEBUG"):
      raise
    disk = disk_error(e)
    if disk is not None:  # OUT unwritable, its disk full
      from tpp_jax.errors import output_error_line
      print("error: " + output_error_line(disk, args.out, "writing the export (OUT)", "OUT",
                                          rerun="rerun with a new (or emptied) OUT"), file=sys.stderr)
      sys.exit(2)
    if not isinstance(e, (ValueError, FileNotFoundError, KeyError, TypeError)):
      raise
    print(f"error: {type(e).__name__}: {e}  (set TPP_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(2)
  print(f"Exported {args.run} ({res['checkpoint']} checkpoint, step {res['step']}) as {res['format']} to "
        f"{res['out']}: {', '.join(res['files'])}")
  return 0


if __name__ == "__main__":
  main()
