"""tpp_jax: Target Parameter Pre-training for parameter-efficient fine-tuning of Vision Transformers.

  import tpp_jax
  tpp_jax.__version__
  config = tpp_jax.load_config("configs/default.py:smoke")
  tpp_jax.train(config, "runs/demo")                            # the CLI's job, from Python
  run = tpp_jax.load_run("runs/demo/seed_0/tpp_finetune")
  run.predict(["x.png", "y.dcm"])                               # class probabilities (N, classes)

The names load lazily (see tpp_jax.api): `import tpp_jax` alone does not import jax.
"""
from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("tpp_jax")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
  __version__ = "0+unknown"

__all__ = ["__version__", "load_run", "train", "load_config", "Run"]


def __getattr__(name):
  if name in ("load_run", "train", "load_config", "Run"):
    from tpp_jax import api
    return getattr(api, name)
  raise AttributeError(f"module 'tpp_jax' has no attribute {name!r}")
