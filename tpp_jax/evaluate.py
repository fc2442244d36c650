"""Stage `eval`: metrics of a saved run, on whole splits, from its latest (or best) checkpoint.

  python -m tpp_jax.main --config configs/experiment.py:stage=eval --workdir RUN_DIR
The run's own config.json defines the model and data; the given config only supplies
`eval_splits` and `eval_checkpoint` ('latest' or 'best'; 'best' falls back to 'latest' when the run kept
none). Writes RUN_DIR/eval.json. Only the eval data is read: the run's backbone file (init.path) and TPP
run (target_init) need not exist any more (checkpoints.restore.load_run).
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tpp_jax import build as build_lib
from tpp_jax import stages
from tpp_jax.checkpoints import restore as restore_lib
from tpp_jax.data import pipeline as data_pipeline
from tpp_jax.data import transforms as data_transforms
from tpp_jax.errors import ConfigError
from tpp_jax.jsonio import write_atomic


def eval_sources(config, splits) -> dict:
  """The run's eval splits (with its data.max_eval_examples subset, as in training); no train split needed."""
  num_classes = int(config.task.num_classes) if stages.get(config.stage).needs_labels else None
  sources = data_pipeline.build_sources(config.data, num_classes=num_classes)
  out = {s: sources[s] for s in splits if s in sources}
  if config.data.get("max_eval_examples", 0):
    out = {s: data_pipeline.random_subset(src, int(config.data.max_eval_examples)) for s, src in out.items()}
  return out


def evaluate_split(run: restore_lib.LoadedRun, source, mesh=None, batch_size: int | None = None) -> dict:
  """Dataset-level metrics of `run` on one source, with the run's eval transform, sharded over `mesh`."""
  mesh = mesh if mesh is not None else build_lib.make_mesh()
  n_dev = mesh.devices.size
  bs = int(batch_size or run.config.eval_batch_size)
  bs = math.ceil(bs / n_dev) * n_dev
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = jax.jit(run.objective.eval_outputs, in_shardings=(repl, repl, data))
  params, aux = jax.device_put((run.params, run.aux), repl)
  acc = run.objective.accumulator()
  fn = data_transforms.make_transform(run.config.data, train=False)
  for batch in data_pipeline.eval_batches(source, fn, bs // jax.process_count(),
                                          shard_index=jax.process_index(), shard_count=jax.process_count()):
    out = step(params, aux, build_lib.global_batch(batch, mesh))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      out = multihost_utils.process_allgather(out, tiled=True)
    acc.add(jax.device_get(out))
  return acc.compute()


def run(config, workdir) -> dict:
  wd = pathlib.Path(workdir).absolute()
  which = config.get("eval_checkpoint", "latest")
  loaded = restore_lib.load_run(wd, "best" if which == "best" else "latest")
  splits = tuple(config.eval_splits)
  sources = eval_sources(loaded.config, splits)
  if not sources:
    raise ConfigError(f"None of eval_splits={list(splits)} is in the run's data "
                      f"({loaded.config.data.path}); fix --config.eval_splits.")
  mesh = build_lib.make_mesh()
  results = {split: evaluate_split(loaded, sources[split], mesh) for split in splits if split in sources}
  out = {"workdir": str(wd), "checkpoint": loaded.checkpoint, "step": int(loaded.step), "results": results}
  write_atomic(wd / "eval.json", json.dumps(out, indent=2))
  print(json.dumps(out, indent=2))
  return out
