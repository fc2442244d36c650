"""User-facing errors: ConfigError (a mistake in the config or a file it names) and the one line every CLI prints for
an OSError (disk full, read-only folder, no permission), also when a library reports one in disguise."""
from __future__ import annotations

import errno
import os
import pathlib
import re

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG)
# What a failed write reports that is an OSError in disguise: tensorstore raises ValueError('RESOURCE_EXHAUSTED: ...
# Failed writing: "/path": ... No space left on device [os_error_code=\'28\']'), safetensors SafetensorError('... Os {
# code: 28, ... }').
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG)
_ERRNO_IN_TEXT = re.compile(r"os_error_code='?(\d+)|\[(?:OS error|Errno) (\d+)|\bcode: (\d+)|\berrno[ :=]+(\d+)")
_PATH_IN_TEXT = re.compile(r"[\"'](?:file://)?(/[^\"']+)[\"']")



class ConfigError(ValueError):
  """A user mistake in the config or in a file it names; main prints the message without a traceback."""


def as_os_error(e: BaseException, path=None) -> OSError | None:
  """The OSError behind `e`, or None when `e` is no disk failure: `e` itself, one in its cause / context chain, or
  one named in its text (tensorstore, safetensors); `path` stands in for a file name the error does not give."""
  if isinstance(e, OSError) and e.errno is not None:
    return e if e.filename is not None or path is None else OSError(e.errno, e.strerror, str(path))
  cause, seen = e.__cause__ or e.__context__, {id(e)}
  while cause is not None and id(cause) not in seen:
    if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
      return as_os_error(cause, path)
    seen.add(id(cause))
    cause = cause.__cause__ or cause.__context__
  text = str(e)
  m = _ERRNO_IN_TEXT.search(text)
  code = int(next(g for g in m.groups() if g)) if m else None
  if code is None:
    code = next((c for c in DISK_ERRNOS if os.strerror(c) in text), None)
  if code not in DISK_ERRNOS:
    return None
  named = _PATH_IN_TEXT.findall(text)  # the last path is the innermost: tensorstore names the database, then the file
  return OSError(code, os.strerror(code), named[-1] if named else None if path is None else str(path))


def os_error_line(e: OSError, what: str, path=None, where: str | None = "--workdir",
                  rerun: str = "rerun the same command to resume") -> str:
  """The one line a CLI prints for an OSError (disk full, read-only folder, no permission), after `error: `:
  `<what was being written>: <path>: [Errno N] <strerror>; <the fix>`.

  `what` and `path` stand in where the error carries none (`e.what`, set by checkpoints.store, and `e.filename`);
  `where` names the option that picks the output folder (None: the file is an input), `rerun` what a rerun after
  freeing space does.
  """
  what = getattr(e, "what", None) or what
  name = e.filename if e.filename is not None else path
  parts = [what]
  if name is not None:
    parts.append(_path_text(name) + (f" -> {_path_text(e.filename2)}" if e.filename2 is not None else ""))
  parts.append(str(e) if e.errno is None else f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}")
  line = ": ".join(parts)
  if e.errno in NO_SPACE:
    return f"{line}; free space on that disk and {rerun}."
  if e.errno in NOT_WRITABLE:
    return f"{line}; make it writable or choose another {where}." if where else f"{line}; check its permissions."
  if e.errno in NOT_A_FOLDER and where:
    return f"{line}; choose another {where}."
  return line + "."


def _path_text(name) -> str:
  return os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)


def output_error_line(e: OSError, out, what: str, where: str, rerun: str = "rerun the same command") -> str:
  """os_error_line for a CLI that writes into the folder `out` (named by the argument `where`): an error on a file
  there, a folder above it or no file at all (a write to an open file) is `what`; one elsewhere, an input read."""
  name = e.filename
  inside = name is None or not isinstance(name, (str, bytes, os.PathLike))
  if not inside:
    p, o = pathlib.Path(os.fsdecode(name)).expanduser().absolute(), pathlib.Path(out).expanduser().absolute()
    inside = p == o or o in p.parents or p in o.parents
  return os_error_line(e, what if inside else "reading a file", path=out, where=where if inside else None,
                       rerun=rerun)
