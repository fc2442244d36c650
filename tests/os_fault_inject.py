"""Run the CLI (`tpp_jax.main.entry`) on a disk that fills up while one checkpoint is saved:
`python tests/os_fault_inject.py STEP ARGS...`.

Every file orbax opens for writing in the unfinished folder of checkpoint step STEP (WORKDIR/checkpoints/
STEP.orbax-checkpoint-tmp-*) raises OSError(ENOSPC, 'No space left on device') as a full disk does, in orbax's own save
threads (its JSON items and step metadata are written through etils.epath); every other step is written as usual.
The library itself has no hook: etils' file opening is wrapped here.
"""
import errno
import os
import sys


def full_disk_open(step: int, open_):
  """etils.epath's Path.open (`open_`) on a disk that is full while checkpoint step `step` is written."""
  unfinished = f"{step}.orbax-checkpoint-tmp"

  def open_on_a_full_disk(self, mode="r", **kwargs):
    parts = self.parts
    in_step = any(p.startswith(unfinished) and i and parts[i - 1] == "checkpoints" for i, p in enumerate(parts))
    if in_step and any(c in mode for c in "wax+"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return open_(self, mode, **kwargs)
  return open_on_a_full_disk


def install(step: int) -> None:
  from etils.epath import gpath
  gpath._GPath.open = full_disk_open(step, gpath._GPath.open)


if __name__ == "__main__":
  install(int(sys.argv[1]))
  from tpp_jax import main
  sys.argv = ["tpp_jax.main", *sys.argv[2:]]
  main.entry()
