"""Named presets shared by the config files: see tpp_jax/configs/presets.py (the shipped code)."""
from tpp_jax.configs.presets import (  # noqa: F401
    ASSETS,
    DEMO_DATA,
    HOUSE_BACKBONE,
    PRESETS,
    SHARED,
    demo,
    house_model,
    kvasir,
    natural,
    pneumonia,
    size,
    smoke,
)
