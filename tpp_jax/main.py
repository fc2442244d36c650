"""CLI: python -m tpp_jax.main --config configs/NAME.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]

Dispatches on config.stage: pretrain | tpp | finetune | linear | full (the training engine),
eval (metrics of a saved run's best/latest checkpoint), pipeline (TPP vs plain PEFT + report).
"""
from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tpp_jax.errors import os_error_line
from tpp_jax.jsonio import written_name

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run (created; an existing run resumes).")

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)


def run(config, workdir: str) -> dict:
  from tpp_jax import config as config_lib
  config_lib.validate(config)
  if config.stage == "pipeline":
    from tpp_jax import pipeline
    return pipeline.run(config, workdir)
  if config.stage == "eval":
    from tpp_jax import evaluate
    return evaluate.run(config, workdir)
  from tpp_jax import engine
  return engine.train(config, workdir)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; overrides look like --config.seed=1.")
  if not _WORKDIR.value:
    _fail("--workdir is required (the run's output folder).")
  from tpp_jax.engine import Interrupted, TrainingError
  try:
    cfg = _CONFIG.value
    if cfg is None:
      _fail("--config is required, e.g. --config configs/default.py")
    if jax_distributed_requested(cfg):
      import jax
      jax.distributed.initialize(**distributed_init_args())
    run(cfg, _WORKDIR.value)
  except Interrupted as e:  # SIGTERM / SIGINT: the run checkpointed and stopped
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop: saved checkpoints are kept
    print("stopped: interrupted; every saved checkpoint is kept; rerun the same command to resume.", file=sys.stderr)
    sys.exit(130)
  except (TrainingError,) + USER_ERRORS as e:
    if os.environ.get("TPP_DEBUG"):
      raise
    _fail(f"{type(e).__name__}: {e}  (set TPP_DEBUG=1 for the traceback)")
  except OSError as e:  # a full disk, a read-only or unwritable folder: the latest intact checkpoint is kept
    if os.environ.get("TPP_DEBUG"):
      raise
    role = run_file_role(e.filename, _WORKDIR.value)  # None: a file outside the run folder (e.g. the data)
    _fail(os_error_line(e, role or "reading a file", path=_WORKDIR.value, where="--workdir" if role else None))


# What a run writes in its workdir: a file or folder name (the innermost one of a path counts) -> what was written.
RUN_FILES = {".lock": "locking the run folder", "config.json": "writing the run's config",
             "checkpoints": "saving a checkpoint",
             "best": "saving the best checkpoint", "damaged_checkpoints": "moving a damaged checkpoint aside",
             "metrics.jsonl": "writing the run's metrics", "summary.json": "writing the run's summary",
             "tb": "writing the TensorBoard events",
             "eval.json": "writing the evaluation", "report.md": "writing the report"}


def run_file_role(filename, workdir) -> str | None:
  """What a run was writing when an OSError named `filename`; None when `filename` is outside the run folder
  `workdir` (and not a folder above it, made for it)."""
  if filename is None or workdir is None or not isinstance(filename, (str, bytes, os.PathLike)):
    return "writing the run (--workdir)"
  p, wd = pathlib.Path(os.fsdecode(filename)).absolute(), pathlib.Path(workdir).absolute()
  if p == wd or p in wd.parents:
    return "creating the run folder (--workdir)"
  try:
    parts = p.relative_to(wd).parts
  except ValueError:
    return None
  names = [written_name(name) for name in reversed(parts)]  # a temporary file counts as the file it becomes
  return next((RUN_FILES[name] for name in names if name in RUN_FILES), "writing the run (--workdir)")


def jax_distributed_requested(cfg) -> bool:
  return bool(cfg.get("distributed", False))


DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_init_args(environ=None) -> dict:
  """Arguments of jax.distributed.initialize for a manual launch: JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (0..N-1), all three set. Neither of the last two set: {}, and jax finds
  what it needs itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes; JAX_COORDINATOR_ADDRESS is read by jax)."""
  environ = os.environ if environ is None else environ
  got = {k: environ[k].strip() for k in DISTRIBUTED_ENV if environ.get(k, "").strip()}
  if "JAX_NUM_PROCESSES" not in got and "JAX_PROCESS_ID" not in got:
    return {}
  missing = [k for k in DISTRIBUTED_ENV if k not in got]
  if missing:
    raise ValueError(f"distributed=True with {', '.join(sorted(got))} set but not {', '.join(missing)}: set all of "
                     f"{', '.join(DISTRIBUTED_ENV)} on every process (or none, to let jax detect the cluster).")
  args = {"coordinator_address": got["JAX_COORDINATOR_ADDRESS"]}
  for key, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    try:
      args[name] = int(got[key])
    except ValueError:
      raise ValueError(f"{key}={got[key]!r} must be an integer.") from None
  if not 0 <= args["process_id"] < args["num_processes"]:
    raise ValueError(f"JAX_PROCESS_ID={args['process_id']} must be in [0, JAX_NUM_PROCESSES={args['num_processes']}).")
  return args


def _fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def explain_override_error(argv) -> str | None:
  """config_flags reports an unknown `--config.a.b=V` key as a bare AttributeError; name it and the valid keys."""
  from tpp_jax import config as config_lib
  spec, keys = None, []
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif a.startswith("--config."):
      keys.append(a[len("--config."):].split("=", 1)[0])
  if not spec or not keys:
    return None
  try:
    config = config_lib.load_config_file(spec)
    for key in keys:
      config_lib.check_key(config, key)
  except config_lib.ConfigError as e:
    return str(e)
  except Exception:  # noqa: BLE001 - the config file itself is broken: let the original error speak
    return None
  return None


def resolve_config_argv(argv: list[str]) -> list[str]:
  """argv with `--config PATH[:ARG]` pointing at the packaged config when PATH is a missing configs/NAME.py."""
  from tpp_jax import config as config_lib
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      prefix, spec = "--config=", a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(out):
      prefix, spec, i = "", out[i + 1], i + 1
    else:
      continue
    path, sep, arg = spec.partition(":")
    out[i] = prefix + config_lib.resolve_config_path(path) + sep + arg
    if arg:  # a bad preset / key in ARG: one line here, not config_flags' traceback while parsing flags
      try:
        config_lib.load_config_file(out[i][len(prefix):])
      except config_lib.ConfigError:
        raise
      except Exception:  # noqa: BLE001 - a broken config file: config_flags reports it as before
        pass
    break
  return out


def entry():
  """The `tpp-jax` console command and `python -m tpp_jax.main`."""
  if any(a in ("-h", "--help", "--helpshort") for a in sys.argv[1:]):
    from tpp_jax import config_help
    print(config_help.text_help(), end="")
    sys.exit(0)
  from tpp_jax.config import ConfigError
  try:
    sys.argv = resolve_config_argv(sys.argv)
  except ConfigError as e:
    _fail(str(e))
  # config_flags raises on unknown --config.x keys / bad values while flags are parsed: show one line.
  try:
    app.run(main)
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001 - last resort so users never get a traceback wall for bad input
    user_error = (flags.Error, AttributeError, ValueError, KeyError, TypeError, FileNotFoundError)
    if not os.environ.get("TPP_DEBUG") and isinstance(e, user_error):
      _fail(explain_override_error(sys.argv) or f"{type(e).__name__}: {e}")
    if not os.environ.get("TPP_DEBUG") and isinstance(e, OSError):  # e.g. reading the config file
      _fail(os_error_line(e, "reading the config", where=None, rerun="rerun the same command"))
    raise


if __name__ == "__main__":
  entry()
