"""Comparison report of TPP vs plain PEFT runs: Markdown tables, learning curves and figures.

  python -m tpp_jax.report RUN_DIR [RUN_DIR ...]

Finds every run folder (one with summary.json) under the given folders and writes RUN_DIR/report.md
(the first folder) with the test / val metric tables (mean ± std over seeds and the paired
TPP − baseline (and TPP − baseline_matched) difference with its 95% CI, paired t-test p and verdict; also in
comparison.json) of the final step and of the checkpoint selected by validation (summary.json `best_final`, with
the steps trained and the best step per arm), the `linear` / `full` bracket arms beside them, learning_curves.png,
with fine-tune runs on part of the labels (data.label_fraction < 1) the label-efficiency table and
label_efficiency.png, the pipeline's own figures when present (mae_reconstructions.png, segmentation_overlays.png),
parameter counts, wall time and images/s.
Only numpy and matplotlib (Agg canvas, no pyplot) are needed (statistics: tpp_jax.stats): no JAX or scipy import.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

from tpp_jax.report.collect import NoRunsError
from tpp_jax.report.markdown import write_report


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  ap = argparse.ArgumentParser(prog="python -m tpp_jax.report", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                  help="pipeline / run folders; report.md is written into the first")
  a = ap.parse_args(argv)
  try:
    path = write_report(a.run_dirs[0], a.run_dirs[1:])
  except (NoRunsError, FileNotFoundError) as e:
    ap.error(str(e))
  except OSError as e:  # the first RUN_DIR unwritable, its disk full: one line, exit 2
    if os.environ.get("TPP_DEBUG"):
      raise
    from tpp_jax.errors import output_error_line
    print("error: " + output_error_line(e, a.run_dirs[0], "writing the report", "first RUN_DIR"), file=sys.stderr)
    sys.exit(2)
  print(f"Report: {path}")
  return path
