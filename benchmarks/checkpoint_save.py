"""How long does a checkpoint save take? orbax's replica-parallel saving vs each replicated array saved whole.

  python benchmarks/checkpoint_save.py [--config "configs/default.py:stage=finetune"] [--pairs 3] [--devices 8]

The state is the one a run of the config saves (build_lib.build + the random init: params, AdamW state, aux; no file
read), replicated over --devices CPU devices as the engine places it. Each row: CheckpointStore.save of that state
(orbax's save, its wait, the checksums) into a new workdir, timed in --pairs pairs, the order alternating. 'whole' is
what tpp_jax does on one host (checkpoints.store.save_replicated_arrays_whole); 'orbax default' is orbax's
ArrayHandler as orbax registers it (replica-parallel off GPU). Last line: `save s: whole X.XX, orbax default Y.YY`
(medians), and that the two saves restore to the same arrays.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/default.py:stage=finetune")
  p.add_argument("--pairs", type=int, default=3)
  p.add_argument("--devices", type=int, default=8, help="CPU devices (XLA's host device count)")
  a = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={a.devices}"

  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from tpp_jax import build as build_lib
  from tpp_jax.checkpoints import store as store_lib
  from tpp_jax.config import load_config_file

  config = load_config_file(a.config)
  built = build_lib.build(config)
  params, aux = build_lib.storage_dtypes(config, *built.init_fn(jax.random.key(0)), built.labels)
  state = jax.device_put({"step": np.int32(0), "params": params, "opt_state": built.tx.init(params), "aux": aux},
                         built.state_sharding)
  leaves = jax.tree_util.tree_leaves(state)
  mib = sum(x.nbytes for x in leaves) / 2**20
  print(f"{a.config}: {len(leaves)} arrays, {mib:.1f} MiB, replicated over {len(jax.devices())} devices")

  default = ocp.type_handlers.get_type_handler(jax.Array)
  store_lib.save_replicated_arrays_whole()
  whole = ocp.type_handlers.get_type_handler(jax.Array)
  if whole is default:
    sys.exit("orbax's registered jax.Array handler is not replica-parallel here (GPU, or several hosts): "
             "nothing to compare.")
  kinds = {"whole": whole, "orbax default": default}
  times = {k: [] for k in kinds}
  root = tempfile.mkdtemp(prefix="tpp_ckpt_bench_")

  def save(kind: str, i: int) -> str:
    ocp.type_handlers.register_type_handler(jax.Array, kinds[kind], override=True)
    wd = os.path.join(root, f"{kind.replace(' ', '_')}_{i}")
    store = store_lib.CheckpointStore(wd)
    ocp.type_handlers.register_type_handler(jax.Array, kinds[kind], override=True)  # the store registered 'whole'
    t = time.perf_counter()
    store.save(1, state, {"note": "bench"})
    times[kind].append(time.perf_counter() - t)
    store.close()
    return wd

  save("whole", -1)  # warm-up: first-use costs (imports, thread pools) fall on neither row
  save("orbax default", -1)
  last = {}
  for i in range(a.pairs):
    for kind in (("whole", "orbax default") if i % 2 == 0 else ("orbax default", "whole")):
      last[kind] = save(kind, i)
  for k in kinds:
    times[k] = times[k][1:]  # drop the warm-up
    print(f"{k:>14}: " + " ".join(f"{t:.2f}" for t in times[k]) + " s")

  restored = []
  for kind, wd in last.items():
    store = store_lib.CheckpointStore(wd)
    restored.append(store.restore(state)[0])
    store.close()
  same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree_util.tree_leaves(restored[0]), jax.tree_util.tree_leaves(restored[1])))
  print(f"restored the same arrays: {same}")
  print(f"save s: whole {statistics.median(times['whole']):.2f}, "
        f"orbax default {statistics.median(times['orbax default']):.2f}")


if __name__ == "__main__":
  main()
