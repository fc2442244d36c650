"""The config files (``get_config(arg)``): this folder is also the package ``tpp_jax.configs`` (pyproject.toml
package-dir), so the wheel ships these very files. ``--config configs/NAME.py`` (or ``--config NAME.py``) finds the
installed copy when that path does not exist, e.g. after ``pip install`` outside a checkout.
"""
import pathlib

DIR = pathlib.Path(__file__).resolve().parent
NAMES = ("default", "experiment", "house_backbone")  # the runnable configs; presets.py holds their presets
