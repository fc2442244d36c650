"""The shipped config files (``get_config(arg)``), installed with the package.

``configs/NAME.py`` in a checkout are thin aliases of these modules; ``--config configs/NAME.py`` (or
``--config NAME.py``) finds the packaged copy when that path does not exist, e.g. after ``pip install``.
"""
import pathlib

DIR = pathlib.Path(__file__).resolve().parent
NAMES = ("default", "experiment", "house_backbone")  # the runnable configs; presets.py holds their presets
