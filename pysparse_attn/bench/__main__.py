"""Command line: ``python -m pysparse_attn.bench sweep|plot|compare|export``.

Examples
--------
Sweep every method on the small mixed workload, then plot and tabulate::

    python -m pysparse_attn.bench sweep -o bench/results/sweep_cpu.jsonl -w mixed-small
    python -m pysparse_attn.bench plot bench/results/sweep_cpu.jsonl -o bench/results/plots
    python -m pysparse_attn.bench compare bench/results/sweep_cpu.jsonl --errors 0.01 0.03 0.05

Evaluate on your own model's tensors (``np.savez("layer7.npz", q=q, k=k, v=v)``)::

    python -m pysparse_attn.bench sweep -o mine.jsonl -w file:layer7.npz:bnhd

Mistakes in the command (an unknown workload, a missing file, a bad option) are reported as one
line on stderr with exit status 2; ``--traceback`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .compare import (DEFAULT_ERRORS, DEFAULT_SPARSITIES, RANKINGS, markdown_matched_error,
                      markdown_matched_sparsity)
from .methods import DEFAULT_METHODS, METHODS
from .results import DOCS_GRID
from .sweep import WORKLOADS, parse_workload, read_records, run_sweep, summary
from . import reuse

USAGE_ERROR = 2  # argparse's own exit status for a bad command line


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block)."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _block(text):
    try:
        bq, bk = (int(x) for x in text.split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"block must look like 64x64, got {text!r}") from error
    return bq, bk


def _setting(text):
    name, _, values = text.partition("=")
    if name not in METHODS or not values:
        raise argparse.ArgumentTypeError(
            f"--values takes METHOD=V1,V2,... with METHOD in {sorted(METHODS)}, got {text!r}")
    try:
        return name, tuple(float(v) for v in values.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--values {text!r}: {error}") from error


def _reference_rows(text):
    if text in ("auto", "all"):
        return text
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if rows < 2:
        raise argparse.ArgumentTypeError(f"--reference-rows takes auto, all or an int >= 2, "
                                         f"got {text!r}")
    return rows


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def build_parser():
    parser = _Parser(prog="python -m pysparse_attn.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python traceback instead of one line")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     metavar="{sweep,plot,compare,export}")

    sweep = commands.add_parser(
        "sweep", help="run methods x settings x workloads to JSONL, then print the "
                      "matched-error table",
        description="Run every (workload, method, setting) not yet in the output file, append "
                    "one JSON record per run, and print the matched-error table of the "
                    "workloads swept (ranked by speedup over dense).")
    sweep.add_argument("-o", "--output", required=True,
                       help="JSONL file (appended to; runs already in it are not redone)")
    sweep.add_argument("-w", "--workload", action="append", default=None,
                       help=f"one of {sorted(WORKLOADS)}, file:PATH[:LAYOUT] (LAYOUT bhnd, "
                            "the default, or bnhd, hnd, nhd; identified by content hash) or "
                            "video:TxHxW:HEADS:HEAD_DIM:KIND+KIND[:SHARPNESS] (repeatable; "
                            "default mixed-small)")
    sweep.add_argument("-m", "--method", action="append", default=None, choices=sorted(METHODS),
                       metavar="METHOD",
                       help=f"method to run, one of {sorted(METHODS)} (repeatable; default all)")
    sweep.add_argument("--grid", choices=("full", "docs"), default="full",
                       help="settings of each method: its full default grid, or the few of "
                            "the docs' measured tables (then -m defaults to those methods)")
    sweep.add_argument("--values", action="append", type=_setting, default=[],
                       metavar="METHOD=V1,V2", help="settings replacing a method's default grid "
                                                    "(repeatable)")
    sweep.add_argument("--backend", default="cpu", choices=("cpu", "cupy", "reference"),
                       help="backend of the timed calls (default cpu)")
    sweep.add_argument("--dtype", default="float32",
                       choices=("float32", "float16", "bfloat16", "float64"),
                       help="dtype of the tensors (default float32)")
    sweep.add_argument("--block", type=_block, default=(64, 64),
                       help="tile sizes BqxBk (default 64x64)")
    sweep.add_argument("--seed", type=int, default=0,
                       help="seed of synthetic workloads and of sampled reference rows "
                            "(default 0)")
    sweep.add_argument("--repeat", type=_positive_int, default=3,
                       help="timed calls per run, alternating with dense calls; medians are "
                            "reported (default 3)")
    sweep.add_argument("--reference-rows", type=_reference_rows, default="auto",
                       help="accuracy reference: 'all' (exact float64 on the host, every row), "
                            "N (exact float32 on N sampled rows, on the backend's device) or "
                            "'auto' (all on CPU backends, 2048 on cupy; the default)")
    sweep.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")

    plot = commands.add_parser("plot", help="error and speedup against sparsity, per workload")
    plot.add_argument("results", nargs="+", help="JSONL files written by sweep")
    plot.add_argument("-o", "--out-dir", required=True, help="folder for the figures")
    plot.add_argument("--format", action="append", choices=("png", "svg", "pdf"), default=None,
                      help="figure format (repeatable; default png and svg)")
    plot.add_argument("--sparsity", default="tile_sparsity",
                      choices=("tile_sparsity", "flop_sparsity"),
                      help="x axis: share of tiles or of dense FLOPs saved (default tiles)")

    compare = commands.add_parser(
        "compare", help="tables of the methods at matched error and at matched sparsity",
        description="Per workload, the best swept setting of each method within each error "
                    "budget (ranked by speedup over dense when the runs have times, by "
                    "sparsity otherwise; the title says which), and the lowest error at each "
                    "sparsity level.")
    compare.add_argument("results", nargs="+", help="JSONL files written by sweep")
    compare.add_argument("--errors", type=float, nargs="+", default=list(DEFAULT_ERRORS),
                         help="error budgets (default 0.01 0.03 0.05)")
    compare.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES),
                         help="sparsity levels of the second table (default 0.5 0.7 0.9)")
    compare.add_argument("--metric", default="rel_l2",
                         choices=("rel_l2", "rel_l1", "rel_l2_worst_head"),
                         help="error metric against the dense reference (default rel_l2)")
    compare.add_argument("--sparsity", default="tile_sparsity",
                         choices=("tile_sparsity", "flop_sparsity"),
                         help="sparsity reported and used by --rank sparsity (default tiles)")
    compare.add_argument("--rank", choices=RANKINGS, default="auto",
                         help="what picks the best setting within a budget and orders the "
                              "methods: speedup, sparsity, or auto (speedup when every run "
                              "has a time; the default)")
    compare.add_argument("--by", choices=("error", "sparsity", "both"), default="both",
                         help="which tables to print (default both)")
    compare.add_argument("--format", dest="fmt", choices=("markdown", "rst"),
                         default="markdown", help="table syntax (default markdown)")

    export = commands.add_parser(
        "export", help="convert sweep runs to the result format the docs tables read",
        description="Write one result record (pysparse_attn.bench.results) per sweep run; "
                    "put the file in bench/results/ to have the docs build tabulate it.")
    export.add_argument("results", nargs="+", help="JSONL files written by sweep")
    export.add_argument("-o", "--output", required=True,
                        help="result JSONL file (appended to)")
    reuse.add_parser(commands)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None):
    """Run the command line; returns the exit status (2 for a mistake in the command)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        try:
            return _run(args, argv)
        except (ValueError, TypeError, OSError) as error:
            if args.traceback:
                raise
            print(f"python -m pysparse_attn.bench {args.command}: error: {error}",
                  file=sys.stderr)
            return USAGE_ERROR


def _run(args, argv):
    if args.command == "reuse":
        print(json.dumps(reuse.run(args, ["python -m pysparse_attn.bench"] + list(
            sys.argv[1:] if argv is None else argv)), indent=1))
        return 0
    if args.command == "sweep":
        workloads = [parse_workload(w, dtype=args.dtype, block=args.block, seed=args.seed)
                     for w in (args.workload or ["mixed-small"])]
        rows = None if args.reference_rows == "all" else args.reference_rows
        methods = args.method or list(DOCS_GRID if args.grid == "docs" else DEFAULT_METHODS)
        values = dict(DOCS_GRID) if args.grid == "docs" else {}
        values.update(dict(args.values))
        done = run_sweep(args.output, workloads, methods,
                         backend=args.backend, repeat=args.repeat, values=values,
                         progress=not args.no_progress, reference_rows=rows,
                         argv=["python -m pysparse_attn.bench"] + list(
                             sys.argv[1:] if argv is None else argv))
        print(f"{done} run(s) added to {args.output}", file=sys.stderr)
        print(summary(read_records(args.output), workloads))
        return 0
    missing = [path for path in args.results if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"results file does not exist: {missing[0]}")
    records = read_records(args.results)
    if not any(r.get("type") == "run" for r in records):
        print(f"python -m pysparse_attn.bench {args.command}: error: no run records in "
              f"{' '.join(args.results)}", file=sys.stderr)
        return 1
    if args.command == "plot":
        from .plot import plot_records

        for path in plot_records(records, args.out_dir, tuple(args.format or ("png", "svg")),
                                 sparsity=args.sparsity):
            print(path)
        return 0
    if args.command == "export":
        from .results import export_sweep, write_results

        results = export_sweep(records)
        write_results(args.output, results)
        print(f"{len(results)} result(s) appended to {args.output}", file=sys.stderr)
        return 0
    if args.by in ("error", "both"):
        print(markdown_matched_error(records, tuple(args.errors), args.metric, args.sparsity,
                                     args.fmt, rank=args.rank))
    if args.by in ("sparsity", "both"):
        print(markdown_matched_sparsity(records, tuple(args.sparsities), args.metric,
                                        args.sparsity, args.fmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
