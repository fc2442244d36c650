"""Stage 0: MAE pre-training of the house ViT-Ti/8 (6 blocks, 64 px) on natural photographs.

  python -m tpp_jax.main --config configs/house_backbone.py --workdir runs/house
The code is tpp_jax/configs/house_backbone.py (shipped); this file keeps the path working in a checkout.
"""
from tpp_jax.configs.house_backbone import get_config  # noqa: F401
