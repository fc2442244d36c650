"""Transparent huge pages for XLA:CPU's per-step temporaries, set by re-executing the CLI once (Linux, glibc).

XLA:CPU allocates a step's temporaries as one block (320 MiB for the demo LoRA fine-tune step of
`benchmarks/step_speed.py`) with malloc and frees it when the step ends. glibc serves a block that large with a
fresh mmap, so every step the kernel pages it in again, 4 KiB at a time: about 80k minor page faults and 120 ms of
kernel time per step on 2 cores. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes glibc advise such blocks for
transparent huge pages (2 MiB): the faults fall about 30x (README "Performance"). glibc reads its tunables only when
a process starts, so `python -m tpp_jax.main` re-executes itself once, first thing, with the tunable added to the
environment. `TPP_HUGEPAGES=0` turns this off; a GLIBC_TUNABLES that already names the tunable is left as it is.
Nothing here imports JAX: the re-exec happens before any backend starts.
"""
from __future__ import annotations

import os
import platform
import sys

ENV = "TPP_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
_MARK = "TPP_HUGEPAGES_REEXEC"  # set in the re-executed process: never re-exec twice, whatever glibc kept


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), None where it cannot be read."""
  try:
    with open(path) as f:
      words = f.read().split()
  except OSError:
    return None
  return next((w.strip("[]") for w in words if w.startswith("[")), None)


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library this Python runs on when it is glibc, else None (musl, macOS, Windows)."""
  lib, version = platform.libc_ver()
  parts = version.split(".")
  if lib != "glibc" or len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
    return None
  return int(parts[0]), int(parts[1])


def requested(environ=None) -> bool:
  """Whether TPP_HUGEPAGES asks for huge pages: unset / empty / 1 yes, 0 no; anything else is one clear error."""
  environ = os.environ if environ is None else environ
  setting = environ.get(ENV, "").strip()
  if setting not in ("", "0", "1"):
    raise ValueError(f"{ENV}={setting!r}: use 1 (transparent huge pages for XLA:CPU's per-step buffers, the "
                     "default) or 0 (glibc's default malloc).")
  return setting != "0"


def active(environ=None) -> bool:
  """Whether this process started with glibc's huge-page tunable on (what the run's summary.json records)."""
  environ = os.environ if environ is None else environ
  return any(t.strip() == f"{TUNABLE}=1" for t in environ.get("GLIBC_TUNABLES", "").split(":"))


def tunables_with_hugepages(environ=None, glibc=None, thp=None) -> str | None:
  """The GLIBC_TUNABLES value with `glibc.malloc.hugetlb=1` added, or None where the process should stay as it is:
  turned off, already re-executed, the tunable already set, not glibc >= 2.35 on Linux, or huge pages off in the
  kernel. `glibc` / `thp` override the detected version / mode (tests)."""
  environ = os.environ if environ is None else environ
  if not requested(environ) or environ.get(_MARK):
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in current or not sys.platform.startswith("linux"):
    return None
  glibc = glibc_version() if glibc is None else glibc
  thp = thp_mode() if thp is None else thp
  if glibc is None or glibc < MIN_GLIBC or thp not in ("always", "madvise"):
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_hugepages() -> None:
  """Replace this process by the same command line with the tunable on (returns only where nothing changes or the
  exec fails). Call it first thing in a command's entry point, before JAX or PyTorch start threads."""
  tunables = tunables_with_hugepages()
  argv = getattr(sys, "orig_argv", None)  # the interpreter's own command line, -m / -X options included
  if tunables is None or not argv or not sys.executable:
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables, **{_MARK: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError:  # e.g. a sandbox without exec: run on with glibc's defaults
    return
