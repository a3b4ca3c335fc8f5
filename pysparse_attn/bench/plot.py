"""Plots of sweep records: error against sparsity (with the Pareto front) and speedup."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

__all__ = ["plot_records", "pareto_front"]


def _save(figure, path, fmt):
    """Save ``figure``; SVGs get no timestamp and fixed element ids, so re-plotting the same
    records gives byte-identical files (and clean diffs of committed plots)."""
    import matplotlib

    if fmt != "svg":
        figure.savefig(path)
        return
    with matplotlib.rc_context({"svg.hashsalt": "pysparse_attn"}):
        figure.savefig(path, metadata={"Date": None})


def pareto_front(points):
    """Points ``(sparsity, error)`` not dominated by another (higher sparsity, lower error)."""
    front, best_error = [], float("inf")
    for sparsity, error in sorted(points, key=lambda p: (-p[0], p[1])):
        if error < best_error:
            front.append((sparsity, error))
            best_error = error
    return sorted(front)


def plot_records(records, out_dir, formats=("png", "svg"), sparsity="tile_sparsity",
                 metric="rel_l2"):
    """Write ``<workload>_error.<fmt>`` and ``<workload>_speedup.<fmt>`` per workload.

    Returns the list of written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.get("type") == "run":
            groups[record["workload"]][record["method"]].append(record)
    def finish(figure, axis, stem):
        axis.legend(fontsize=7, ncol=2)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        paths = [out_dir / f"{stem}.{fmt}" for fmt in formats]
        for path, fmt in zip(paths, formats):
            _save(figure, path, fmt)
        plt.close(figure)
        return paths

    written = []
    for workload, methods in sorted(groups.items()):
        safe = workload.replace(":", "_").replace("/", "_")
        markers = "os^vD<>pPX*h"
        figure, axis = plt.subplots(figsize=(7, 4.5))
        everything = []
        errors = [r[metric] for runs in methods.values() for r in runs if r[metric] > 0]
        # Exact runs have zero error: drawn hollow on a labelled line a decade below the
        # smallest nonzero error, so a log axis shows them without inventing a value.
        zero_at = (min(errors) if errors else 1e-3) / 10
        for index, (method, runs) in enumerate(sorted(methods.items())):
            runs = sorted(runs, key=lambda r: r[sparsity])
            xs = [r[sparsity] for r in runs]
            ys = [r[metric] if r[metric] > 0 else zero_at for r in runs]
            everything += list(zip(xs, ys))
            marker = markers[index % len(markers)]
            line, = axis.plot(xs, ys, marker=marker, ms=4, lw=1, label=method)
            exact = [x for x, r in zip(xs, runs) if r[metric] == 0]
            axis.plot(exact, [zero_at] * len(exact), marker=marker, ms=8, mfc="none",
                      mec=line.get_color(), lw=0)
        if any(r[metric] == 0 for runs in methods.values() for r in runs):
            axis.axhline(zero_at, color="grey", lw=0.6, ls="--")
            axis.annotate("error 0 (exact), hollow", (0.0, zero_at),
                          xycoords=("axes fraction", "data"), xytext=(3, 3),
                          textcoords="offset points", fontsize=7, color="grey")
        front = pareto_front(everything)
        axis.step([p[0] for p in front], [p[1] for p in front], where="post", color="k",
                  lw=2, alpha=0.3, label="Pareto front")
        for budget in (0.01, 0.03, 0.05):
            axis.axhline(budget, color="grey", lw=0.6, ls=":")
        axis.set_yscale("log")
        axis.set_xlabel(sparsity.replace("_", " "))
        axis.set_ylabel(f"{metric.replace('_', ' ')} vs dense (float64)")
        axis.set_title(f"{workload}: error against sparsity")
        written += finish(figure, axis, f"{safe}_error")

        figure, axis = plt.subplots(figsize=(7, 4.5))
        for index, (method, runs) in enumerate(sorted(methods.items())):
            runs = sorted(runs, key=lambda r: r[sparsity])
            axis.plot([r[sparsity] for r in runs], [r["speedup"] for r in runs],
                      marker=markers[index % len(markers)], ms=4, lw=1, label=method)
        axis.axhline(1.0, color="grey", lw=0.6)
        backend = next(iter(next(iter(methods.values()))))["backend"]
        axis.set_xlabel(sparsity.replace("_", " "))
        axis.set_ylabel(f"speedup over dense ({backend} backend)")
        axis.set_title(f"{workload}: speedup against sparsity")
        written += finish(figure, axis, f"{safe}_speedup")
    return written
