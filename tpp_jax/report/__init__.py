"""Comparison report of TPP vs plain PEFT runs: Markdown tables, learning curves and figures.

  python -m tpp_jax.report RUN_DIR [RUN_DIR ...]   (tpp_jax.report.cli: what it writes)

collect: run folders -> records; tables: metric / paired / label-efficiency tables and comparison.json's numbers;
plots: the figures; markdown: report.md (write_report). Only numpy and matplotlib (Agg canvas, no pyplot) are
needed (statistics: tpp_jax.stats): no JAX or scipy import.
"""
from tpp_jax.report.cli import main
from tpp_jax.report.collect import ARM_ORDER, PRETEXT_STAGES, NoRunsError, collect
from tpp_jax.report.collect import _get as _get  # launch/results_table.py reads config values with it
from tpp_jax.report.markdown import BRACKETS, FIGURES, write_report
from tpp_jax.report.plots import (
    ARM_COLORS,
    plot_label_efficiency,
    plot_learning_curves,
    plot_reconstructions,
    plot_segmentation_overlays,
)
from tpp_jax.report.tables import (
    BASELINES,
    SOURCES,
    comparison_data,
    label_efficiency,
    label_efficiency_table,
    metric_table,
    paired_comparisons,
    paired_differences,
    paired_table,
)

__all__ = [
    "ARM_COLORS", "ARM_ORDER", "BASELINES", "BRACKETS", "FIGURES", "PRETEXT_STAGES", "SOURCES", "NoRunsError",
    "collect", "comparison_data", "label_efficiency", "label_efficiency_table", "main", "metric_table",
    "paired_comparisons", "paired_differences", "paired_table", "plot_label_efficiency", "plot_learning_curves",
    "plot_reconstructions", "plot_segmentation_overlays", "write_report",
]
