"""tpp_jax/hugepages.py: when the CLI re-executes itself with glibc's huge-page tunable, that the re-exec really
happens, that glibc then backs a large malloc block with huge pages, and what the run's summary records."""
import json
import os
import subprocess
import sys

import pytest

from tpp_jax import hugepages

from conftest import SMOKE_CLI, run_cli

SUPPORTED = (sys.platform.startswith("linux") and (hugepages.glibc_version() or (0, 0)) >= hugepages.MIN_GLIBC
             and hugepages.thp_mode() in ("always", "madvise"))
needs_support = pytest.mark.skipif(not SUPPORTED, reason="needs Linux, glibc >= 2.35 and transparent huge pages on")


def test_when_the_tunable_is_added():
  on = dict(glibc=(2, 36), thp="madvise")
  assert hugepages.tunables_with_hugepages({}, **on) == "glibc.malloc.hugetlb=1"
  assert hugepages.tunables_with_hugepages({"TPP_HUGEPAGES": "1"}, **on) == "glibc.malloc.hugetlb=1"
  assert (hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **on)
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")  # the user's tunables are kept
  assert hugepages.tunables_with_hugepages({}, glibc=(2, 36), thp="always") == "glibc.malloc.hugetlb=1"
  unchanged = [({"TPP_HUGEPAGES": "0"}, on), ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, on),
               ({"TPP_HUGEPAGES_REEXEC": "1"}, on),  # already re-executed once: never again
               ({}, dict(glibc=(2, 34), thp="madvise")), ({}, dict(glibc=(2, 36), thp="never")),
               ({}, dict(glibc=(2, 36), thp=""))]
  for environ, detected in unchanged:
    assert hugepages.tunables_with_hugepages(environ, **detected) is None, environ


def test_a_bad_setting_is_one_error_naming_the_variable():
  for bad in ("yes", "2", "off"):
    with pytest.raises(ValueError, match="TPP_HUGEPAGES=.*use 1 .* or 0"):
      hugepages.requested({"TPP_HUGEPAGES": bad})


def test_active_reads_the_tunable_the_process_started_with():
  assert hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"})
  assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert not hugepages.active({})


def test_thp_mode_and_glibc_version(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None
  if not hasattr(os, "confstr") or "CS_GNU_LIBC_VERSION" not in os.confstr_names:
    pytest.skip("no glibc here")
  lib, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # the C library's own answer, e.g. "glibc 2.36"
  assert lib == "glibc" and hugepages.glibc_version() == tuple(int(p) for p in version.split(".")[:2])


_SHOW = ("import os, sys; from tpp_jax import hugepages; hugepages.reexec_with_hugepages(); "
         "print(os.environ.get('GLIBC_TUNABLES', ''), os.environ.get('TPP_HUGEPAGES_REEXEC', ''), sys.argv[1:])")


def _python(code, *args, env=None):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TPP_HUGEPAGES_REEXEC")} | (env or {})
  r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stdout.split()


@needs_support
def test_the_process_re_executes_itself_once_with_the_tunable():
  assert _python(_SHOW, "--x=1") == ["glibc.malloc.hugetlb=1", "1", "['--x=1']"]  # same arguments after the exec
  assert _python(_SHOW, env={"TPP_HUGEPAGES": "0"}) == ["[]"]  # off: no exec, nothing set


_FAULTS = """
import ctypes, resource, sys
libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p
n = 256 << 20  # as large as XLA:CPU's per-step block: glibc serves it with mmap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(ctypes.c_size_t(n)); ctypes.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@needs_support
def test_glibc_backs_a_large_block_with_huge_pages_under_the_tunable():
  if hugepages.thp_mode() != "madvise":
    pytest.skip("THP mode 'always' gives huge pages without the tunable too")
  plain = int(_python(_FAULTS, env={"GLIBC_TUNABLES": ""})[0])
  huge = int(_python(_FAULTS, env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})[0])
  assert plain >= 60_000, plain  # one fault per 4 KiB page: 65,536
  assert huge < plain / 20, (huge, plain)  # 2 MiB pages: about 128


def _summary(wd, env):
  r = run_cli(SMOKE_CLI + ["--workdir", str(wd), "--config.steps=2"], env=env)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  return json.loads((wd / "summary.json").read_text())


def test_cli_runs_with_huge_pages_and_turns_them_off_on_request(tmp_path):
  clean = {"GLIBC_TUNABLES": "", "TPP_HUGEPAGES_REEXEC": ""}
  on, off = _summary(tmp_path / "on", clean), _summary(tmp_path / "off", {**clean, "TPP_HUGEPAGES": "0"})
  assert on["host_hugepages"] is SUPPORTED and off["host_hugepages"] is False
  assert on["final"] == off["final"]  # the allocator moves the same bytes elsewhere: the same metrics, bit for bit
  r = run_cli(SMOKE_CLI + ["--workdir", str(tmp_path / "bad"), "--config.steps=2"], env={"TPP_HUGEPAGES": "yes"})
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode != 0 and len(errors) == 1 and "TPP_HUGEPAGES='yes'" in errors[0], r.stderr[-2000:]
  assert not (tmp_path / "bad").exists()


def test_predict_cli_names_a_bad_setting_in_one_error(tmp_path):
  env = {**os.environ, "TPP_HUGEPAGES": "on"}
  r = subprocess.run([sys.executable, "-m", "tpp_jax.predict", str(tmp_path / "run"), str(tmp_path / "in.npz"),
                      str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1 and "TPP_HUGEPAGES='on'" in errors[0], r.stderr[-2000:]
  assert not (tmp_path / "out").exists()
