"""Command line: ``python -m pysparse_attn.bench sweep|plot|compare``.

Examples
--------
Sweep every method on the small mixed workload, then plot and tabulate::

    python -m pysparse_attn.bench sweep -o bench/results/sweep_cpu.jsonl -w mixed-small
    python -m pysparse_attn.bench plot bench/results/sweep_cpu.jsonl -o bench/results/plots
    python -m pysparse_attn.bench compare bench/results/sweep_cpu.jsonl --errors 0.01 0.03 0.05

Evaluate on your own model's tensors (``np.savez("layer7.npz", q=q, k=k, v=v)``)::

    python -m pysparse_attn.bench sweep -o mine.jsonl -w file:layer7.npz:bnhd
"""

from __future__ import annotations

import argparse
import json
import sys

from .compare import (DEFAULT_ERRORS, DEFAULT_SPARSITIES, markdown_matched_error,
                      markdown_matched_sparsity)
from .methods import DEFAULT_METHODS, METHODS
from .sweep import WORKLOADS, parse_workload, read_records, run_sweep
from . import reuse


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


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m pysparse_attn.bench",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", help="run methods x settings x workloads to JSONL")
    sweep.add_argument("-o", "--output", required=True, help="JSONL file (appended; resumable)")
    sweep.add_argument("-w", "--workload", action="append", default=None,
                       help=f"{sorted(WORKLOADS)}, file:PATH[:LAYOUT] or "
                            "video:TxHxW:HEADS:HEAD_DIM:KIND+KIND[:SHARPNESS] (repeatable; "
                            "default mixed-small)")
    sweep.add_argument("-m", "--method", action="append", default=None, choices=sorted(METHODS),
                       help="method (repeatable; default all)")
    sweep.add_argument("--values", action="append", type=_setting, default=[],
                       metavar="METHOD=V1,V2", help="override a method's settings")
    sweep.add_argument("--backend", default="cpu", help="cpu, cupy or reference (default cpu)")
    sweep.add_argument("--dtype", default="float32",
                       help="float32, float16, bfloat16 or float64 (default float32)")
    sweep.add_argument("--block", type=_block, default=(64, 64), help="BqxBk (default 64x64)")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--repeat", type=int, default=3, help="timed calls per run (median)")
    sweep.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")

    plot = commands.add_parser("plot", help="error/speedup against sparsity figures")
    plot.add_argument("results", nargs="+", help="JSONL files")
    plot.add_argument("-o", "--out-dir", required=True)
    plot.add_argument("--format", action="append", choices=("png", "svg", "pdf"), default=None,
                      help="repeatable; default png and svg")
    plot.add_argument("--sparsity", default="tile_sparsity",
                      choices=("tile_sparsity", "flop_sparsity"))

    compare = commands.add_parser("compare", help="markdown table at matched error/sparsity")
    compare.add_argument("results", nargs="+", help="JSONL files")
    compare.add_argument("--errors", type=float, nargs="+", default=list(DEFAULT_ERRORS))
    compare.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    compare.add_argument("--metric", default="rel_l2",
                         choices=("rel_l2", "rel_l1", "rel_l2_worst_head"))
    compare.add_argument("--sparsity", default="tile_sparsity",
                         choices=("tile_sparsity", "flop_sparsity"))
    compare.add_argument("--by", choices=("error", "sparsity", "both"), default="both")
    compare.add_argument("--format", dest="fmt", choices=("markdown", "rst"),
                         default="markdown")
    reuse.add_parser(commands)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "reuse":
        print(json.dumps(reuse.run(args, ["python -m pysparse_attn.bench"] + list(
            sys.argv[1:] if argv is None else argv)), indent=1))
        return 0
    if args.command == "sweep":
        workloads = [parse_workload(w, dtype=args.dtype, block=args.block, seed=args.seed)
                     for w in (args.workload or ["mixed-small"])]
        done = run_sweep(args.output, workloads, args.method or list(DEFAULT_METHODS),
                         backend=args.backend, repeat=args.repeat, values=dict(args.values),
                         progress=not args.no_progress,
                         argv=["python -m pysparse_attn.bench"] + list(
                             sys.argv[1:] if argv is None else argv))
        print(f"{done} run(s) added to {args.output}", file=sys.stderr)
        return 0
    records = read_records(args.results)
    if not any(r.get("type") == "run" for r in records):
        print(f"no run records in {args.results}", file=sys.stderr)
        return 1
    if args.command == "plot":
        from .plot import plot_records

        for path in plot_records(records, args.out_dir, tuple(args.format or ("png", "svg")),
                                 sparsity=args.sparsity):
            print(path)
        return 0
    if args.by in ("error", "both"):
        print(markdown_matched_error(records, tuple(args.errors), args.metric, args.sparsity,
                                     args.fmt))
    if args.by in ("sparsity", "both"):
        print(markdown_matched_sparsity(records, tuple(args.sparsities), args.metric,
                                        args.sparsity, args.fmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
