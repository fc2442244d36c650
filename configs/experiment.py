"""Any stage on any data: `--config configs/experiment.py:PRESETS,key=value,...`.

Examples and presets: tpp_jax/configs/experiment.py and tpp_jax/configs/presets.py (the shipped code; this
file keeps the path working in a checkout).
"""
from tpp_jax.configs.experiment import get_config  # noqa: F401
