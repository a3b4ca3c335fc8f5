"""The main job: every method at a few settings on a video-like workload, against dense.

``python -m pysparse_attn demo`` (``make demo``) prints one table row per (method, setting):
tile sparsity, min/mean recall, relative L2 error against dense, time and speedup, each column
explained under the table, then writes a plot of speedup against error beside sparsity against
error (one curve per method, each point labelled with its setting) and says where.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

from . import _api
from ._rules import Blasst, Cef, Recall
from ._select import TopK, TopP

__all__ = ["main", "demo_methods"]


@dataclass
class Row:
    method: str
    setting: str
    sparsity: float
    recall_min: float
    recall_mean: float
    rel_l2: float
    seconds: float
    speedup: float


def demo_methods(n_keys: int, block_k: int):
    """``(method, setting, call)`` triples; ``call(q, k, v, **common)`` returns (out, stats)."""
    def dense(q, k, v, **common):
        return _api.attention(q, k, v, return_stats=True, **common)

    def attend(**options):
        return lambda q, k, v, **common: _api.attention(q, k, v, return_stats=True,
                                                        **options, **common)

    methods = [("dense", "-", dense)]
    for lam in (1e-2, 1e-3, 1e-4):
        methods.append(("Blasst natural", f"lam={lam:g}", attend(skip=Blasst(lam),
                                                                  order="natural")))
        methods.append(("Blasst peak", f"lam={lam:g}", attend(skip=Blasst(lam))))
    for mass in (1.0, 0.1, 0.01):
        rule = Cef.from_mass(mass, block_k, n_keys)
        methods.append(("Cef natural", f"from_mass({mass:g})", attend(skip=rule,
                                                                      order="natural")))
    for target in (0.99, 0.95, 0.8):
        methods.append(("Recall peak", f"R={target:g}", attend(skip=Recall(target))))
    methods.append(("Recall exact peak", "R=0.95", attend(skip=Recall(0.95, exact=True))))
    for ratio in (0.5, 0.25, 0.1):
        methods.append(("TopK", f"ratio={ratio:g}", attend(select=TopK(ratio=ratio))))
    for p in (0.99, 0.95, 0.9):
        methods.append(("TopP", f"p={p:g}", attend(select=TopP(p))))
    return methods


def _sla_rows(q, k, v, dense_out, common, repeats):
    """SLA at two splits, untrained (W = 0) and with a projection fitted by least squares.

    The zero-initialised SLA equals sparse-only attention; the fitted ``W, b`` stand in for
    the fine-tuning SLA is designed for (in-sample, so an optimistic bound on what training
    reaches) and show what the linear branch can recover.
    """
    from .bench.methods import fit_sla_projection

    rows = []
    for critical, negligible in ((0.1, 0.5), (0.05, 0.6)):
        options = dict(critical=critical, negligible=negligible, **common)
        weight, bias = fit_sla_projection(q, k, v, dense_out, critical, common["block"],
                                          common["backend"], negligible=negligible)
        if hasattr(q, "get"):  # GPU inputs: the projection goes to the device too
            import cupy

            weight, bias = cupy.asarray(weight), cupy.asarray(bias)
        for label, w, b in (("SLA W=0", None, None), ("SLA fitted W", weight, bias)):
            def run():
                return _api.sla_attention(q, k, v, proj_weight=w, proj_bias=b,
                                          return_stats=True, **options)
            out, seconds = _timed(run, repeats, common["backend"])
            rows.append((label, f"crit={critical:g} negl={negligible:g}", out, seconds))
    return rows


def _timed(run, repeats, backend):
    """``(result, median time)`` of ``repeats`` calls after one untimed warm-up call (CUDA
    events on the GPU: :func:`pysparse_attn.bench.timing.time_rounds`)."""
    from .bench.timing import time_rounds

    (seconds,), (result,), _ = time_rounds([run], repeats, backend)
    return result, seconds


def _rel_l2(out, dense):
    out = np.asarray(out, dtype=np.float64)
    dense = np.asarray(dense, dtype=np.float64)
    return float(np.linalg.norm(out - dense) / np.linalg.norm(dense))


COLUMNS = (
    ("method", "the method, as the public API spells it"),
    ("setting", "its parameter (R: Recall's target; lam: Blasst/Cef threshold; crit/negl: SLA)"),
    ("sparsity", "share of key tiles whose P.V was skipped (plan-dropped or skipped in the loop)"),
    ("rec min/mean", "exact float64 recall, the kept share of each row's softmax mass: min, mean"),
    ("rel L2", "||O - O_dense|| / ||O_dense||, O_dense the dense call of the same backend"),
    ("time ms", "median time of the repeated calls after a warm-up call (CUDA events on a GPU)"),
    ("speedup", "dense time / this time: same backend, same inputs, same run"),
)


def _format_table(rows, backend):
    header = (f"{'method':<18} {'setting':<22} {'sparsity':>8} {'rec min':>8} {'rec mean':>8} "
              f"{'rel L2':>9} {'time ms':>9} {'speedup':>8}")
    lines = [f"backend: {backend}", header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.method:<18} {r.setting:<22} {r.sparsity:>8.1%} {r.recall_min:>8.4f} "
                     f"{r.recall_mean:>8.4f} {r.rel_l2:>9.2e} {1e3 * r.seconds:>9.1f} "
                     f"{r.speedup:>7.2f}x")
    lines.append("")
    lines += [f"  {name:<13} {meaning}" for name, meaning in COLUMNS]
    return "\n".join(lines)


def _plot(rows, path, title):
    """Speedup against error beside tile sparsity against error, one curve per method.

    Errors are on a log axis; runs whose error is exactly zero are drawn as hollow markers on a
    dotted line at the left edge labelled "error 0 (exact)", not at an invented small value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    nonzero = [r.rel_l2 for r in rows if r.rel_l2 > 0]
    zero_at = (min(nonzero) if nonzero else 1e-3) / 10
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    markers = "os^vD<>pPX*h"
    panels = ((axes[0], "speedup", "speedup over dense (same backend, same run)"),
              (axes[1], "sparsity", "tile sparsity (share of key tiles whose P.V was skipped)"))
    for ax, field, label in panels:
        for index, method in enumerate(dict.fromkeys(r.method for r in rows)):
            points = sorted((r for r in rows if r.method == method), key=lambda r: r.rel_l2)
            xs = [r.rel_l2 if r.rel_l2 > 0 else zero_at for r in points]
            ys = [getattr(r, field) for r in points]
            line, = ax.plot(xs, ys, marker=markers[index % len(markers)], ms=5, lw=1,
                            label=method)
            for x, y, r in zip(xs, ys, points):
                if r.rel_l2 == 0:  # hollow: the error is zero, drawn on the "exact" line
                    ax.plot([x], [y], marker=markers[index % len(markers)], ms=9,
                            mfc="none", mec=line.get_color(), lw=0)
                ax.annotate(r.setting, (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=6, color=line.get_color())
        ax.axvline(zero_at, color="grey", lw=0.8, ls=":")
        ax.annotate("error 0 (exact)", (zero_at, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=7, color="grey")
        if field == "speedup":  # log: 2x faster and 2x slower are the same distance from 1
            ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xscale("log")
        ax.set_xlabel("relative L2 error vs dense (log; hollow markers: error exactly 0)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("what you buy: speed at each error")
    axes[1].set_title("what is skipped: tiles at each error")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(frames=8, height=16, width=24, head_dim=64, block=(64, 64), repeats=3,
             output_dir="demo_output", backend="auto"):
    """Run the demo and return its rows; see the module docstring."""
    from tqdm import tqdm

    from .workloads import video_qkv

    q, k, v = video_qkv(shape=(frames, height, width), heads=4, head_dim=head_dim,
                        dtype=np.float32, seed=0)
    on_gpu = backend == "cupy"
    if backend == "auto":
        try:
            import cupy

            on_gpu = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:  # no CuPy or no device: the CPU backend runs the demo
            on_gpu = False
    if on_gpu:
        from .bench.sweep import to_backend

        q, k, v = (to_backend(x, "cupy", "bfloat16") for x in (q, k, v))
        block = (128, 64)
    common = dict(block=block, backend="cupy" if on_gpu else backend)
    if on_gpu:
        common["backend"] = "cupy"
    host = lambda x: x.get() if hasattr(x, "get") else np.asarray(x)  # noqa: E731
    q_host, k_host = host(q).astype(np.float64), host(k).astype(np.float64)

    methods = demo_methods(k.shape[2], block[1])
    rows = []
    dense_out = dense_seconds = None
    progress = tqdm(total=len(methods) + 4, desc="demo", unit="run", file=sys.stderr)
    for method, setting, call in methods:
        (out, stats), seconds = _timed(lambda: call(q, k, v, **common), repeats,
                                       common["backend"])
        if method == "dense":
            dense_out, dense_seconds = host(out), seconds
        recall = _api.recall(q_host, k_host, host(stats.kept), block=block)
        rows.append(Row(method, setting, stats.sparsity, float(recall.min()),
                        float(recall.mean()), _rel_l2(host(out), dense_out), seconds,
                        dense_seconds / seconds))
        progress.update()
    for method, setting, (out, stats), seconds in _sla_rows(q, k, v, dense_out, common,
                                                            repeats):
        recall = _api.recall(q_host, k_host, host(stats.kept), block=block)
        rows.append(Row(method, setting, stats.sparsity, float(recall.min()),
                        float(recall.mean()), _rel_l2(host(out), dense_out), seconds,
                        dense_seconds / seconds))
        progress.update()
    progress.close()
    backend_name = common["backend"]
    if backend_name == "auto":
        from . import backends

        backend_name = backends.resolve("auto", on_gpu)
    workload = (f"video_qkv T x H x W = {frames} x {height} x {width} ({q.shape[2]} tokens), "
                f"4 heads (local, temporal, global, diffuse), D = {head_dim}, {q.dtype}, "
                f"block {block}")
    print(f"workload: {workload}")
    print(_format_table(rows, backend_name))
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(output_dir, "pareto.png"))
    _plot(rows, path, f"pysparse_attn demo, {backend_name} backend: {workload}")
    print(f"Plot (speedup and tile sparsity against error, points labelled with their "
          f"settings): {path}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pysparse_attn demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="latent frames T (default 8)")
    parser.add_argument("--height", type=int, default=16, help="latent height (default 16)")
    parser.add_argument("--width", type=int, default=24, help="latent width (default 24)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension D (default 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per row after a warm-up; the median is kept (default 3)")
    parser.add_argument("--backend", default="auto",
                        help="auto (GPU when CuPy sees one, else cpu), cpu, cupy or reference")
    parser.add_argument("--output-dir", default="demo_output",
                        help="folder of the plot (default demo_output)")
    args = parser.parse_args(argv)
    run_demo(frames=args.frames, height=args.height, width=args.width, head_dim=args.head_dim,
             repeats=args.repeats, output_dir=args.output_dir, backend=args.backend)
