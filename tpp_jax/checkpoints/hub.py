"""Hugging Face Hub ids as init.path: `hf://ORG/NAME[@REVISION]` and `timm://NAME[@REVISION]` (= the Hub repo
timm/NAME) -> the local snapshot folder, through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE).

Only config.json and the weights are fetched: safetensors first, PyTorch .bin only for a repo without them. The
folder is then read exactly as a local Hugging Face folder (checkpoints/load.py). Anything else passes through as a
local path.
"""
from __future__ import annotations

import pathlib

from tpp_jax.errors import ConfigError

SCHEMES = {"hf://": "", "timm://": "timm/"}  # scheme -> the Hub namespace it implies
CONFIG = ["config.json"]
WEIGHTS = (["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
           ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"])
FORM = "hf://ORG/NAME or hf://ORG/NAME@REVISION (a Hugging Face model repo) or timm://NAME (the repo timm/NAME)"


def is_hub_id(path) -> bool:
  return isinstance(path, str) and path.startswith(tuple(SCHEMES))


def parse(path: str) -> tuple[str, str | None]:
  """`hf://ORG/NAME@REV` -> ('ORG/NAME', 'REV'); `timm://NAME` -> ('timm/NAME', None); ConfigError if malformed."""
  scheme = next(s for s in SCHEMES if path.startswith(s))
  rest = path[len(scheme):]
  repo, at, revision = rest.partition("@")
  from huggingface_hub.utils import validate_repo_id
  try:
    if not repo.strip("/") or "@" in revision or (at and not revision):
      raise ValueError("empty name or revision")
    repo = SCHEMES[scheme] + repo.strip("/")
    validate_repo_id(repo)
  except ValueError as e:
    raise ConfigError(f"init.path={path!r} is not a Hub id ({str(e).splitlines()[0]}); write it as {FORM}.") from None
  return repo, revision or None


def local_path(path) -> pathlib.Path:
  """The local file or folder init.path names: a Hub id is downloaded (or found in the cache), the rest is a path."""
  if not is_hub_id(path):
    return pathlib.Path(str(path)).expanduser()
  repo, revision = parse(path)
  folder = None
  for weights in WEIGHTS:  # a repo with safetensors never has its .bin copy downloaded too
    folder = _snapshot(path, repo, revision, CONFIG + weights)
    if any(any(folder.glob(p)) for p in weights):
      return folder
  raise FileNotFoundError(f"init.path={path!r}: the Hub repo {repo!r} (in {folder}) holds neither model.safetensors "
                          "nor pytorch_model.bin; check the name (a ViT checkpoint repo), or, if it was cached "
                          "without its weights, run once online (HF_HUB_OFFLINE unset) to fetch them.")


def _snapshot(path: str, repo: str, revision: str | None, patterns: list[str]) -> pathlib.Path:
  from huggingface_hub import constants, errors, snapshot_download
  try:
    return pathlib.Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
  except Exception as e:  # noqa: BLE001 - every Hub failure becomes one line naming the id and the fix
    if isinstance(e, OSError) and e.errno is not None:
      raise  # disk full / no permission in the cache: main's one line for OSErrors names the file
    rev = f" at revision {revision!r}" if revision else ""
    fetch = (f"or download it where there is network (`hf download {repo} --local-dir DIR`) and set "
             "--config.init.path=DIR")
    if isinstance(e, errors.RevisionNotFoundError):
      why = f"the Hub repo {repo!r} has no revision {revision!r}; check the @REVISION (a branch, tag or commit)"
    elif isinstance(e, errors.GatedRepoError):
      why = f"the Hub repo {repo!r} is gated; accept its terms on huggingface.co and log in (`hf auth login`)"
    elif isinstance(e, errors.RepositoryNotFoundError):
      why = (f"there is no model repo {repo!r} on the Hugging Face Hub; check the name (a private repo needs "
             "`hf auth login`)")
    elif isinstance(e, errors.IncompleteSnapshotError):
      why = f"the cached copy of {repo!r}{rev} is incomplete and the Hub cannot be reached; run once online, {fetch}"
    elif isinstance(e, errors.LocalEntryNotFoundError):
      how = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub cannot be reached (no network?)"
      why = (f"{repo!r}{rev} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {how}; check the name, "
             f"run once online to cache it, {fetch}")
    else:
      why = f"fetching {repo!r}{rev} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    raise FileNotFoundError(f"init.path={path!r}: {why}.") from None
