"""Does the training input keep up? Iterator images/s (data.workers x data.cache) vs the train step's.

  python benchmarks/input_pipeline.py [--config configs/default.py] [--batches 50] [--steps 10]
  python benchmarks/input_pipeline.py --config configs/house_backbone.py

Rows: the training iterator of the config (tpp_jax.data.pipeline.train_iter with the config's training
transform and batch size) for data.cache on/off and data.workers 0, 1 and auto; 'build s' is the time
to build the train source (the up-front decode when the cache is on), 'first s' the time to the first
batch (worker start-up), images/s is measured over --batches batches after that. Then the jitted train
step of the same config (engine.Trainer.train_step on one fixed batch, after compilation; a `pipeline`
config times its TPP arm and its fine-tune arm). Last line: `headroom: X.Xx` = best iterator images/s /
fastest step images/s (the issue's goal: >= 3x). Runs on what jax sees; the iterator uses the CPUs.
"""
from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def with_data(config, **fields):
  c = copy.deepcopy(config)
  with c.unlocked():
    c.data.update(fields)
  return c


def arms(config) -> dict:
  """The training stages of a config: itself, or a `pipeline` config's TPP and fine-tune arms."""
  if config.stage != "pipeline":
    return {config.stage: config}
  from tpp_jax import pipeline as tpp_pipeline
  derived = tpp_pipeline.arm_configs(config, int(config.seed), pathlib.Path(tempfile.gettempdir()) / "tpp_bench")
  return {"tpp": derived["tpp"], "finetune": derived["baseline"]}


def train_source(config, cache: str):
  """The config's full train split, built with data.cache=cache; (source, seconds)."""
  from tpp_jax.data import pipeline as data_pipeline
  num_classes = int(config.task.num_classes) if config.stage not in ("pretrain", "tpp") else None
  t0 = time.perf_counter()
  src = data_pipeline.build_sources(with_data(config, cache=cache, max_train_examples=0).data,
                                    num_classes=num_classes)["train"]
  return src, time.perf_counter() - t0


def iterator_rate(source, transform, batch_size: int, workers: int, batches: int, seed: int = 0):
  """(seconds to the first batch, images/s over the next `batches` batches)."""
  from tpp_jax.data import pipeline as data_pipeline
  t0 = time.perf_counter()
  it = data_pipeline.train_iter(source, transform, batch_size, seed, num_workers=workers)
  next(it)
  first = time.perf_counter() - t0
  for _ in range(min(3, batches)):  # fill the prefetch buffers
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * batch_size / (time.perf_counter() - t0)
  close = getattr(it, "close", None)
  if close:
    close()
  del it
  return first, rate


def step_rate(config, steps: int) -> tuple[int, float]:
  """(batch size, images/s of the jitted train step on one fixed batch, after compilation)."""
  import jax

  from tpp_jax import build as build_lib
  from tpp_jax import engine
  small = max(256, 2 * int(config.batch_size))
  c = with_data(config, max_train_examples=small, max_eval_examples=64)
  with c.unlocked():
    c.progress = False
  with tempfile.TemporaryDirectory(prefix="tpp_bench_") as workdir:
    trainer = engine.Trainer(c, workdir)
  batch = build_lib.global_batch(next(trainer.train_iterator()), trainer.mesh)
  state = trainer.state
  for _ in range(2):  # compile + warm-up
    state, mets = trainer.train_step(state, batch, trainer.base_rng)
  jax.block_until_ready(mets)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, mets = trainer.train_step(state, batch, trainer.base_rng)
  jax.block_until_ready(mets)
  return int(c.batch_size), steps * int(c.batch_size) / (time.perf_counter() - t0)


def main(argv=None) -> float:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/default.py", help="SPEC, e.g. configs/default.py:smoke")
  ap.add_argument("--batches", type=int, default=50, help="iterator batches timed per row")
  ap.add_argument("--steps", type=int, default=10, help="train steps timed per arm")
  ap.add_argument("--workers", default="0,1,auto", help="data.workers values to time (comma list)")
  ap.add_argument("--cache", default="on,off", help="data.cache values to time (comma list)")
  args = ap.parse_args(argv)

  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's spawned workers read absl flags
  import jax

  from tpp_jax.config import load_config_file
  from tpp_jax.data import pipeline as data_pipeline
  from tpp_jax.data import transforms as data_transforms

  config = load_config_file(args.config)
  stages = arms(config)
  first_arm = next(iter(stages.values()))
  d = config.data
  print(f"config {args.config}: stage {config.stage}, source {d.source}, {d.image_size} px, "
        f"augment crop_scale={d.augment.crop_scale} hflip={d.augment.hflip}")
  print(f"machine: {cores()} CPU cores for the input; jax {jax.default_backend()} "
        f"({jax.device_count()} device(s)) for the step")

  transform = data_transforms.make_transform(d, train=True)
  batch_size = int(first_arm.batch_size)
  rows = []
  print(f"\ntraining iterator (batch {batch_size}, {args.batches} batches timed)")
  print(f"  {'cache':<6}{'workers':<14}{'build s':>8}{'first s':>9}{'images/s':>11}")
  for cache in [s.strip() for s in args.cache.split(",") if s.strip()]:
    source, build = train_source(first_arm, cache)
    timed = {}
    for w in [s.strip() for s in args.workers.split(",") if s.strip()]:
      n = data_pipeline.resolve_workers(w)
      label = w if str(n) == w else f"{w} (={n})"
      if n in timed:
        first, rate = timed[n]  # the same setting as a row above
      else:
        first, rate = timed[n] = iterator_rate(source, transform, batch_size, n, args.batches)
        rows.append(rate)
      print(f"  {cache:<6}{label:<14}{build:>8.2f}{first:>9.2f}{rate:>11,.0f}")
    del source

  print(f"\ntrain step (jitted, one fixed batch, {args.steps} steps after compilation)")
  print(f"  {'arm':<10}{'batch':>6}{'images/s':>11}")
  steps = []
  for name, cfg in stages.items():
    b, rate = step_rate(cfg, args.steps)
    steps.append(rate)
    print(f"  {name:<10}{b:>6}{rate:>11,.0f}")
  headroom = max(rows) / max(steps)
  print(f"\nheadroom: {headroom:.1f}x")
  return headroom


if __name__ == "__main__":
  main()
