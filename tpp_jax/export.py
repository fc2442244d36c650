"""Export a trained run for use elsewhere.

  python -m tpp_jax.export RUN OUT --format adapter|peft|merged [--checkpoint best|latest]

  adapter  OUT/adapter.safetensors + adapter_config.json: the target (PEFT) parameters, the task head and the
           config that made them (any PEFT type). Start a run from it with --config.init.adapter=OUT (target
           params + task head) or --config.target_init=OUT (target params only).
  peft     OUT/adapter_model.safetensors + adapter_config.json (+ README.md) in Hugging Face peft's LoRA format,
           for LoRA / DoRA / rsLoRA runs on a Hugging Face ViT backbone: PeftModel.from_pretrained(
           ViTModel.from_pretrained(init.path folder), OUT). Also loads back as --config.target_init=OUT.
  merged   OUT/model.safetensors + config.json: LoRA / DoRA / SSF folded into the backbone, a plain Hugging Face
           ViTModel (ViTModel.from_pretrained(OUT)); the task head beside it (head.safetensors + head_config.json).

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
LORA_TYPES = ("lora", "dora")
UNMERGEABLE = ("adapter", "adaptformer", "vpt")


class ExportError(config_lib.ConfigError):
  """The export cannot be made as asked (the message names what would work)."""


# ------------------------------------------------------------------------------------------------
# Checks made from the run's config.json alone (before anything is read or written)
# ------------------------------------------------------------------------------------------------

def _has_target(config) -> bool:
  return config.stage in ("tpp", "finetune") and (config.peft.type != "none" or bool(config.train_extra))


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
                        + ("" if ptype in UNMERGEABLE else " or --format merged (a Hugging Face ViTModel)") + ".")
    if hf_fmt not in ("hf_vit", "hf_vit_mae"):
      init = str(config.init.path or "")
      why = ("was trained from random init" if not init or config.init.format == "none" else
             f"init.path={init!r} does not exist any more" if not pathlib.Path(init).expanduser().exists() else
             f"init.path={init!r} is {'a ' + hf_fmt + ' checkpoint' if hf_fmt else 'not a Hugging Face checkpoint'}")
      raise ExportError(f"--format peft needs a backbone that came from a Hugging Face ViTModel / ViTMAE checkpoint "
                        f"(the base model peft attaches to), but {run_dir}'s backbone {why}; use --format adapter, "
                        "or --format merged (a standalone Hugging Face ViTModel).")
  if fmt == "merged":
    if config.stage in ("tpp", "finetune") and config.peft.type in UNMERGEABLE:
      raise ExportError(f"--format merged cannot fold peft.type={config.peft.type!r} into a Hugging Face ViTModel "
                        "(it adds modules ViTModel does not have; merging works for LoRA, DoRA, SSF, BitFit and "
                        "plain runs); export it with --format adapter.")
    if config.model.get("layer_scale", False):
      raise ExportError("--format merged writes a Hugging Face ViTModel, which has no LayerScale (model.layer_scale,"
                        " a Dinov2 backbone); export it with --format adapter.")
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


def export_peft(run, out: pathlib.Path, hf_fmt: str, weights: pathlib.Path) -> list[str]:
  from safetensors.numpy import save_file

  from tpp_jax import partition
  from tpp_jax.checkpoints import adapter as adapter_lib
  target = partition.subtree(run.params, _labels(run.config, run.params), "target")
  try:
    tensors = adapter_lib.peft_state_dict(target.get("encoder", {}))
  except ValueError as e:
    raise ExportError(f"{e}; use --format adapter.") from None
  base = adapter_lib.hf_folder(str(run.config.init.path))
  base_class = "ViTMAEModel" if hf_fmt == "hf_vit_mae" else "ViTModel"
  cfg = adapter_lib.peft_config_json(run.encoder.peft, str(base), base_class)
  _peft_notes(run, base)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / adapter_lib.PEFT_WEIGHTS), metadata={"format": "pt"})
  write_atomic(out / adapter_lib.CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
  p = run.encoder.peft
  write_atomic(out / "README.md",
      f"# {p.type.upper()}{' (rsLoRA)' if p.rslora else ''} adapter exported by tpp_jax\n\n"
      f"Base model: `{base}` ({base_class}). Trained by the `{run.config.stage}` run `{run.run_dir}` "
      f"(step {run.step}, {run.checkpoint} checkpoint); r={p.rank}, alpha={p.alpha}, targets={list(p.targets)}.\n\n"
      "```python\nimport torch, transformers, peft\n"
      f"base = transformers.{base_class}.from_pretrained({str(base)!r})\n"
      f"model = peft.PeftModel.from_pretrained(base, {str(out.absolute())!r}).eval()\n"
      f"images = torch.randn(2, {run.encoder.cfg.channels}, {run.encoder.cfg.image_size}, "
      f"{run.encoder.cfg.image_size})  # normalised with data.mean/std = {list(run.config.data.mean)}/"
      f"{list(run.config.data.std)}\n"
      "tokens = model(pixel_values=images).last_hidden_state\n```\n\n"
      "The task head is not part of the peft format: export the run with `--format adapter` or `--format merged` "
      "for it.\n")
  return [adapter_lib.PEFT_WEIGHTS, adapter_lib.CONFIG_FILE, "README.md"]


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
  base_cfg = {}
  if hf_fmt in ("hf_vit", "hf_vit_mae") and weights is not None:
    sd.update(_pooler(weights, run.encoder.cfg.width))
    cfg_file = weights.parent / "config.json"
    base_cfg = read_json(cfg_file, require_object=True) if cfg_file.is_file() else {}
  out.mkdir(parents=True, exist_ok=True)
  save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
  write_atomic(out / "config.json", json.dumps(hf_export.vit_config_json(run.encoder.cfg, base_cfg), indent=2) + "\n")
  files = ["model.safetensors", "config.json"]
  head, aux = _head_leaves(run)
  if head:
    save_file({k: np.ascontiguousarray(v) for k, v in {**head, **aux}.items()}, str(out / "head.safetensors"))
    t, vit = run.config.task, run.encoder.cfg
    pool = "last_hidden_state[:, 0]" if vit.pooling == "cls" else "last_hidden_state[:, 1:].mean(1)"
    usage = (f"logits = ({pool}) @ head/fc/kernel + head/fc/bias" if t.type == "classification" and t.head == "linear"
             else "apply with tpp_jax (models/heads.py) on the encoder outputs")
    info = {**_provenance(run), "head": sorted(head), "aux": sorted(aux), "pooling": vit.pooling,
            "num_classes": int(t.num_classes), "usage": usage}
    write_atomic(out / "head_config.json", json.dumps(info, indent=2, default=str) + "\n")
    files += ["head.safetensors", "head_config.json"]
  return files


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
