"""Past one host, for real: two local CPU processes under `jax.distributed.initialize` train one run.

The pair (4 fake CPU devices each, coordinator on 127.0.0.1) runs the real CLI with `--config.distributed=True`
into ONE workdir, stopping at step 2 (stop_after) and resuming to step 4 in a second launch; the test checks it
against ONE process with 8 devices fed the same global batches (process 0's local batch, then process 1's), and that
what the pair wrote restores in a single process.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tpp_jax import build as build_lib
from tpp_jax import engine
from tpp_jax import main as main_lib
from tpp_jax import workdir as workdir_lib
from tpp_jax.checkpoints import restore as restore_lib
from tpp_jax.checkpoints import store as store_lib
from tpp_jax.data import pipeline as data_pipeline

from conftest import ROOT, load_config, one_error_line, run_cli

SPEC = "configs/experiment.py:demo,smoke,steps=4"
OVERRIDES = {"checkpoint_every": 2, "log_every": 1, "distributed": True}
N_PROC, DEV_PER_PROC = 2, 4


def _config():
  c = load_config("experiment", SPEC.split(":", 1)[1])
  for k, v in OVERRIDES.items():
    c[k] = v
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_pair(workdir, extra=(), timeout=600):
  """Start N_PROC CLI processes on one coordinator; wait for all; returns [(returncode, stdout + stderr)]."""
  port = _free_port()
  args = [sys.executable, "-m", "tpp_jax.main", "--config", SPEC, "--workdir", str(workdir),
          *[f"--config.{k}={v}" for k, v in OVERRIDES.items()], *extra]
  base = {k: v for k, v in os.environ.items() if "_proxy" not in k.lower()}  # gRPC to 127.0.0.1, no proxy
  procs = []
  for i in range(N_PROC):
    env = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEV_PER_PROC}", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(N_PROC), JAX_PROCESS_ID=str(i))
    log = open(workdir.parent / f"process_{i}_{port}.log", "w+")
    procs.append((subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  deadline, first_fail = time.time() + timeout, None
  while any(p.poll() is None for p, _ in procs):
    now = time.time()
    if first_fail is None and any(p.poll() not in (None, 0) for p, _ in procs):
      first_fail = now  # one failed: give the others a minute to notice, then stop them
    if now > deadline or (first_fail is not None and now > first_fail + 60):
      for p, _ in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.5)
  out = []
  for p, log in procs:
    p.wait()
    log.seek(0)
    out.append((p.returncode, log.read()))
    log.close()
  return out


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
  """The workdir of the two-process run (trained once for the module: steps 1-2, stop, resume, steps 3-4) and each
  process's (returncode, output) of both launches."""
  wd = tmp_path_factory.mktemp("distributed") / "run"
  t0 = time.time()
  results = _launch_pair(wd, ["--config.stop_after=2"])
  if all(rc == 0 for rc, _ in results):
    results += _launch_pair(wd)
  print(f"two-process run, two launches: {time.time() - t0:.1f} s")
  return wd, results


def _assert_ok(results):
  """(a) Every process of both launches exited 0."""
  assert len(results) == 2 * N_PROC, [out[-3000:] for _, out in results]
  for i, (rc, out) in enumerate(results):
    assert rc == 0, f"process {i % N_PROC} of launch {i // N_PROC + 1} exited {rc}:\n{out[-4000:]}"


def _single_process_reference(tmp_path):
  """One process, 8 devices: the same config and init, each step fed the pair's global batch (host 0's rows first)."""
  c = _config()
  t = engine.Trainer(c, tmp_path / "reference")
  assert t.mesh.devices.size == N_PROC * DEV_PER_PROC
  local = int(c.batch_size) // N_PROC
  its = [data_pipeline.train_iter(t.sources["train"], t.train_fn, local, int(c.seed), shard_index=i,
                                  shard_count=N_PROC, balance=bool(c.data.balance), prefetch=int(c.data.prefetch))
         for i in range(N_PROC)]
  state, losses = t.state, {}
  for step in range(1, int(c.steps) + 1):
    parts = [next(it) for it in its]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, mets = t.train_step(state, build_lib.global_batch(batch, t.mesh), t.base_rng)
    losses[step] = float(mets["loss"])
  t.state = state
  return t, losses, {s: t.evaluate(s) for s in c.eval_splits}


def _max_abs_diff(a, b) -> float:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in zip(la, lb))


def test_two_processes_train_like_one_with_the_same_global_batch(pair_run, tmp_path):
  wd, results = pair_run
  _assert_ok(results)  # (a)
  for _, out in results[N_PROC:]:  # the second launch resumed the pair's step-2 checkpoint on both hosts
    assert "Resumed" in out and "at step 2" in out, out[-2000:]
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["devices"] == N_PROC * DEV_PER_PROC and summary["steps"] == 4

  ref, ref_losses, ref_final = _single_process_reference(tmp_path)
  pair = restore_lib.load_run(wd, "latest")  # (b) the final parameters, restored in this (single) process
  assert pair.step == 4
  diff = _max_abs_diff(pair.params, jax.device_get(ref.state["params"]))
  print(f"max |params(2 processes x 4 devices) - params(1 process x 8 devices)| = {diff:.3g}")
  assert diff <= 1e-5

  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  assert set(train) == set(ref_losses)
  for s in train:  # the per-step losses are the global batch's, not one host's
    assert abs(train[s] - ref_losses[s]) <= 1e-5, (s, train[s], ref_losses[s])
  for split, want in ref_final.items():  # eval: every example of the split once, gathered from both hosts
    got = summary["final"][split]
    assert set(got) == set(want)
    for k in want:
      assert got[k] == pytest.approx(want[k], abs=1e-5), (split, k)


def test_checkpoints_of_the_pair_restore_in_one_process(pair_run, tmp_path):
  wd, results = pair_run
  _assert_ok(results)
  # every step holds both hosts' shards and process 0 sealed it with checksums that cover them
  for folder in ("checkpoints", "best"):
    steps = workdir_lib.step_folders(wd / folder)
    assert steps, folder
    for step in steps:
      step_dir = wd / folder / str(step)
      assert (step_dir / store_lib.CHECKSUMS).exists(), step_dir
      assert store_lib.damage(step_dir) is None, step_dir
  assert workdir_lib.step_folders(wd / "checkpoints") == [2, 4]

  latest, best = restore_lib.load_run(wd, "latest"), restore_lib.load_run(wd, "best")
  assert (latest.checkpoint, best.checkpoint, best.step) == ("latest", "best", 4)
  assert _max_abs_diff(latest.params, best.params) == 0.0

  # the full training state (optimizer, step, data iterator) restores into a single process's 8-device shardings
  t = engine.Trainer(_config(), tmp_path / "one")
  store = store_lib.CheckpointStore(wd, keep=2)
  state, meta = store.restore(t.state)
  store.close()
  assert int(state["step"]) == 4 and "data_iter" in meta
  assert _max_abs_diff(jax.device_get(state["params"]), latest.params) == 0.0
  assert not (wd / store_lib.DAMAGED).exists()


def test_files_are_written_once_by_process_0(pair_run):
  wd, results = pair_run
  _assert_ok(results)
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["split"]) for r in rows]
  assert len(keys) == len(set(keys)), keys  # no row twice (process 1 logs nothing)
  assert sorted(keys) == sorted([(s, "train") for s in range(1, 5)] + [(4, "val"), (4, "test")])
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["config"]["distributed"] is True
  assert json.loads((wd / "config.json").read_text())["distributed"] is True
  left = sorted(p.name for p in wd.iterdir())
  assert left == ["best", "checkpoints", "config.json", "metrics.jsonl", "summary.json", "tb"], left  # no .lock, no tmp
  assert len(list((wd / "tb").iterdir())) == 2  # one event file per launch: process 0's


def test_distributed_init_args_from_the_environment():
  f = main_lib.distributed_init_args
  assert f({}) == {}  # a real cluster: jax.distributed.initialize() detects it
  assert f({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == {}  # jax reads that one itself
  assert f({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
    f({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='x'"):
    f({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"})
  with pytest.raises(ValueError, match=r"must be in \[0, JAX_NUM_PROCESSES=2\)"):
    f({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})


def test_a_half_set_launch_is_one_error_line(tmp_path):
  r = run_cli(["--config", SPEC, "--workdir", str(tmp_path / "wd"), "--config.distributed=True"],
              env={"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, timeout=300)
  line = one_error_line(r)
  assert "JAX_COORDINATOR_ADDRESS" in line
  assert not (tmp_path / "wd").exists()


def test_a_damaged_checkpoint_is_set_aside_once_and_both_hosts_resume_from_the_same_step(pair_run, tmp_path):
  wd, results = pair_run
  _assert_ok(results)
  run = tmp_path / "run"
  shutil.copytree(wd, run)
  files = [p for p in (run / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)  # a parameter chunk, written by one of the hosts
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF
  victim.write_bytes(bytes(data))
  more = _launch_pair(run, ["--config.steps=6"])
  for i, (rc, out) in enumerate(more):
    assert rc == 0, f"process {i} exited {rc}:\n{out[-4000:]}"
    assert "Resumed" in out and "at step 2" in out, out[-3000:]  # both hosts: the newest intact step
  assert "is damaged" in more[0][1]
  assert [p.name for p in (run / store_lib.DAMAGED).iterdir()] == ["checkpoints_4"]  # moved once, by process 0
  assert workdir_lib.step_folders(run / "checkpoints") == [4, 6]
  assert restore_lib.load_run(run, "latest").step == 6
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["split"]) for r in rows]
  assert sorted(keys) == sorted([(s, "train") for s in range(1, 7)] + [(6, "val"), (6, "test")])
