"""Evaluation harness: sweep methods and settings over workloads, plot, compare.

Run ``python -m pysparse_attn.bench --help``. The pieces are importable too:

* :mod:`~pysparse_attn.bench.methods`: the methods (``METHODS``) and their swept settings;
* :mod:`~pysparse_attn.bench.metrics`: exact references (float64 on every row, or float32 on
  sampled rows where the tensors live), recall and error metrics;
* :mod:`~pysparse_attn.bench.sweep`: workloads and the resumable JSONL sweep;
* :mod:`~pysparse_attn.bench.plot` and :mod:`~pysparse_attn.bench.compare`: figures and
  tables from the records (ranked by speedup over dense when the runs have times);
* :mod:`~pysparse_attn.bench.results`: the result format the docs' measured tables are
  generated from.
"""

from .compare import markdown_matched_error, markdown_matched_sparsity, matched_error
from .methods import METHODS, Method
from .metrics import dense_reference, error_metrics, recall_from_tile_mass, sampled_reference
from .plot import plot_records
from .results import export_sweep, read_results, render_method_tables
from .sweep import WORKLOADS, Workload, parse_workload, read_records, run_sweep

__all__ = [
    "METHODS",
    "Method",
    "WORKLOADS",
    "Workload",
    "parse_workload",
    "run_sweep",
    "read_records",
    "dense_reference",
    "sampled_reference",
    "export_sweep",
    "read_results",
    "render_method_tables",
    "error_metrics",
    "recall_from_tile_mass",
    "plot_records",
    "matched_error",
    "markdown_matched_error",
    "markdown_matched_sparsity",
]
