"""Checkpoint integrity: checksums written with each step and verified on restore; a damaged step is reported in one
line, moved aside (never deleted) and the run resumes from the newest intact one to the uninterrupted result."""
import json

import pytest

from tpp_jax import main
from tpp_jax.checkpoints import restore, store

from conftest import load_config

ARG = "demo,smoke,steps=6,checkpoint_every=2,eval_every=3,log_every=1"


def _biggest_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _final(wd):
  return json.loads((wd / "summary.json").read_text())["final"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = tmp_path_factory.mktemp("ref") / "run"
  main.run(load_config("experiment", ARG), str(wd))
  return _final(wd)


def _interrupted(tmp_path):
  """A run stopped at step 4 (stop_after), holding checkpoints 2 and 4 with their checksums."""
  wd = tmp_path / "run"
  main.run(load_config("experiment", ARG + ",stop_after=4"), str(wd))
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["2", "4"]
  assert all((wd / "checkpoints" / s / store.CHECKSUMS).exists() for s in ("2", "4"))
  return wd


def _flip(path, at=None):
  data = bytearray(path.read_bytes())
  i = len(data) // 2 if at is None else at
  data[i] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "deleted", "truncated_unverified"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, capsys, reference, damage):
  wd = _interrupted(tmp_path)
  victim = _biggest_file(wd / "checkpoints" / "4")
  if damage == "flipped":
    _flip(victim)
  elif damage == "deleted":
    victim.unlink()
  else:
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    if damage == "truncated_unverified":  # a step saved before checksums existed: found by its failed restore
      (wd / "checkpoints" / "4" / store.CHECKSUMS).unlink()
  capsys.readouterr()
  main.run(load_config("experiment", ARG), str(wd))
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warnings) == 1 and str(wd / "checkpoints" / "4") in warnings[0], err[-2000:]
  if damage != "truncated_unverified":
    assert str(victim.relative_to(wd / "checkpoints" / "4")) in warnings[0]
  assert (wd / store.DAMAGED / "checkpoints_4").is_dir()  # kept for inspection, never deleted
  assert _final(wd) == reference  # resumed from step 2: the same result as the uninterrupted run


def test_every_checkpoint_damaged_is_one_error(tmp_path):
  wd = _interrupted(tmp_path)
  for s in ("2", "4"):
    _flip(_biggest_file(wd / "checkpoints" / s))
  with pytest.raises(ValueError, match="no intact checkpoint is left"):
    main.run(load_config("experiment", ARG), str(wd))


def test_a_damaged_checkpoint_read_by_another_run_names_the_file(tmp_path):
  wd = tmp_path / "run"
  main.run(load_config("experiment", "demo,smoke,steps=4,eval_every=2"), str(wd))
  best = next((wd / "best").iterdir())
  victim = _biggest_file(best)
  _flip(victim)
  with pytest.raises(ValueError, match=f"checkpoint {best} is damaged: {victim} changed since it was saved"):
    restore.load_run(wd, "best")


def test_checksums_cover_every_file_of_a_step(tmp_path):
  wd = _interrupted(tmp_path)
  step = wd / "checkpoints" / "4"
  sums = json.loads((step / store.CHECKSUMS).read_text())
  assert set(sums) == {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file() and p.name != store.CHECKSUMS}
  assert store.damage(step) is None
  (step / "meta" / "metadata").write_text('{"data_iter": "edited"}')
  assert "meta/metadata" in store.damage(step)


def test_one_host_saves_replicated_arrays_whole_and_reads_orbax_default_checkpoints(tmp_path):
  """store.save_replicated_arrays_whole: orbax's replica-parallel saving (its default off GPU) is turned off on one
  host; a checkpoint saved either way restores to the same arrays through the other; a user's own handler is kept."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  registered = ocp.type_handlers.get_type_handler(jax.Array)  # put back at the end
  default = ocp.type_handlers.ArrayHandler()  # orbax's default (a store opened earlier in this process replaced it)
  rep = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
  rng = np.random.default_rng(0)
  state = {"w": jax.device_put(rng.normal(size=(64, 48)).astype(np.float32), rep),
           "b": jax.device_put(rng.normal(size=(48,)).astype(np.float32), rep),
           "step": jax.device_put(np.int32(3), rep)}
  assert len(jax.devices()) == 8 and state["w"].is_fully_replicated

  def save(wd, handler):
    s = store.CheckpointStore(wd)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    s.save(3, state, {"k": 1})
    s.close()

  try:
    ocp.type_handlers.register_type_handler(jax.Array, default, override=True)
    s = store.CheckpointStore(tmp_path / "probe")
    whole = ocp.type_handlers.get_type_handler(jax.Array)
    s.close()
    assert default._use_replica_parallel and not whole._use_replica_parallel  # orbax's default here; now off
    save(tmp_path / "default", default)
    save(tmp_path / "whole", whole)
    for saved_with, restore_with in (("default", whole), ("whole", default), ("whole", whole)):
      ocp.type_handlers.register_type_handler(jax.Array, restore_with, override=True)
      s = store.CheckpointStore(tmp_path / saved_with)
      got, meta = s.restore(state)
      s.close()
      assert meta == {"k": 1}
      for k in ("w", "b", "step"):
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(state[k]))
        assert got[k].sharding.is_equivalent_to(rep, 2)
    # a handler of the user's own class is left alone
    ocp.type_handlers.register_type_handler(jax.Array, type("MyHandler", (ocp.type_handlers.ArrayHandler,), {})(),
                                            override=True)
    store.CheckpointStore(tmp_path / "mine").close()
    assert type(ocp.type_handlers.get_type_handler(jax.Array)).__name__ == "MyHandler"
  finally:
    ocp.type_handlers.register_type_handler(jax.Array, registered, override=True)


def test_after_a_failed_save_only_the_abandoned_write_coroutines_are_silent_at_exit():
  """orbax's array writes that never started (a full disk failed the save first) warn 'never awaited' at exit."""
  import subprocess
  import sys
  code = ("import asyncio, gc, warnings\n"
          "from tpp_jax.checkpoints import store\n"
          "async def write_fragment(): pass\n"
          "store.quiet_abandoned_writes()\n"
          "pending = write_fragment()\n"
          "warnings.warn('other warnings still show', RuntimeWarning)\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "other warnings still show" in r.stderr and "never awaited" not in r.stderr, r.stderr
  r = subprocess.run([sys.executable, "-c", code.replace("store.quiet_abandoned_writes()", "")],
                     capture_output=True, text=True, timeout=120)
  assert "was never awaited" in r.stderr, r.stderr  # what the filter removes does appear without it
