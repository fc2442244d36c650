"""python -m tpp_jax.report RUN_DIR [RUN_DIR ...]: see tpp_jax.report.cli."""
from tpp_jax.report.cli import main

if __name__ == "__main__":
  main()
