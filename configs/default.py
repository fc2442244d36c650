"""The embedded demo: TPP vs plain LoRA on real chest X-rays with the house MAE backbone.

  python -m tpp_jax.main --config configs/default.py --workdir runs/demo          (~5-10 min, 2 CPU cores)
  python -m tpp_jax.main --config configs/default.py:smoke --workdir runs/smoke   (same path, < 2 min)

The code is tpp_jax/configs/default.py (shipped with the package, so `tpp-jax --config configs/default.py`
works after `pip install` too); this file keeps the path working in a checkout.
"""
from tpp_jax.configs.default import get_config, smoke  # noqa: F401
