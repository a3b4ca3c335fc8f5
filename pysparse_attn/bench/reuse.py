"""``python -m pysparse_attn.bench reuse``: plan reuse along a denoising trajectory.

Per step of a trajectory (synthetic, :func:`pysparse_attn.workloads.denoising_trajectory`, or
a user's capture, :func:`pysparse_attn.workloads.load_trajectory`), one layer is attended
three ways: dense, the in-loop rule alone over every tile, and :class:`pysparse_attn.PlanReuse`
with the same rule (guard, plan building and dilation included in its time). Each step records
the three times, the reuse call's plan and kept densities, its error against exact float64
attention, its recall bound and true recall, and which heads refreshed; a summary record adds
the totals. Results go to ``PREFIX.jsonl`` (environment header, one record per step, summary),
``PREFIX.md`` (the table) and ``PREFIX.png``/``.svg`` (error and time per step).

Errors and true recalls use every query row when the trajectory is small and a seeded sample
of query tiles per head otherwise (``--error-tiles``), computed in float64 on the inputs'
device.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import workloads
from .._api import attention
from .._plan import tile_count
from .._rules import Blasst, Cef, Recall
from ..reuse import PlanReuse
from .sweep import environment

__all__ = ["add_parser", "run", "parse_rule", "exact_rows", "markdown_table", "plot_steps"]

_RULES = {"recall": Recall, "blasst": Blasst, "cef": Cef}


def parse_rule(text):
    """``recall:0.95``, ``blasst:1e-3`` or ``cef:-8.5`` -> the rule object."""
    name, _, value = text.partition(":")
    if name not in _RULES or not value:
        raise ValueError(f"--skip must look like recall:0.95, blasst:1e-3 or cef:-8.5, "
                         f"got {text!r}")
    return _RULES[name](float(value))


def _dims(text, count, name):
    try:
        values = tuple(int(x) for x in text.split("x"))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"{name} must look like {'x'.join(['8'] * count)}, got {text!r}")
    return values


def add_parser(commands):
    """Register the ``reuse`` subcommand on an argparse subparsers object."""
    parser = commands.add_parser("reuse", help="plan reuse along a denoising trajectory",
                                 description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True,
                        help="path prefix: writes PREFIX.jsonl, PREFIX.md, PREFIX.png/.svg")
    parser.add_argument("--shape", default="9x15x26",
                        help="token grid TxHxW or a name in workloads.SHAPES (default 9x15x26)")
    parser.add_argument("--heads", type=int, default=None,
                        help="heads of the synthetic trajectory (default: the shape's)")
    parser.add_argument("--head-dim", type=int, default=None,
                        help="head dimension D (default: the shape's)")
    parser.add_argument("--kinds", default="local+temporal+global+diffuse",
                        help="head kinds joined by + (default all four)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="trajectory seed (default 0)")
    parser.add_argument("--jumps", default="", help="steps where the structure jumps, e.g. 12,30")
    parser.add_argument("--trajectory", default=None,
                        help="directory of saved per-step q, k, v (load_trajectory) instead")
    parser.add_argument("--layout", default="bhnd", help="layout of saved tensors")
    parser.add_argument("--grid", default=None, help="TxHxW token grid of saved tensors")
    parser.add_argument("--dtype", default="float32",
                        help="float32, float16, bfloat16 or float64 (default float32)")
    parser.add_argument("--backend", default="cpu", help="cpu, cupy or reference")
    parser.add_argument("--block", default="64x64", help="BqxBk (default 64x64)")
    parser.add_argument("--skip", default="recall:0.95", help="in-loop rule (recall:0.95)")
    parser.add_argument("--refresh-every", type=int, default=5,
                        help="steps between scheduled refreshes (default 5)")
    parser.add_argument("--dense-steps", type=int, default=2,
                        help="first steps computed dense (default 2)")
    parser.add_argument("--margin", type=int, default=0,
                        help="tiles of dilation around the reused kept set (default 0)")
    parser.add_argument("--mass-budget", type=float, default=0.02,
                        help="guard: allowed growth of the estimated outside mass (default 0.02)")
    parser.add_argument("--kept-tolerance", type=float, default=0.1,
                        help="guard: allowed move of the kept share inside the plan (default 0.1)")
    parser.add_argument("--order", default=None, help="natural, score or peak (default: peak)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per step (median)")
    parser.add_argument("--error-tiles", type=int, default=None,
                        help="query tiles per head for errors (default: all when small)")
    return parser


# ---------------------------------------------------------------------------------------------
# Exact reference on (some) query rows


def _namespace(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def exact_rows(q, k, v, kept, rows, block, scale):
    """Exact float64 attention of the query ``rows`` and the true recall of ``kept`` there.

    Parameters
    ----------
    q, k, v : arrays ``(B, H, N, D)`` (k, v may have fewer heads: GQA)
    kept : bool array ``(B, H, nq, nk)``
    rows : int array
        Query row indices (the same for every batch entry and head).
    block : (int, int)
    scale : float

    Returns
    -------
    out : float64 ``(B, H, len(rows), D)``
    recall : float64 ``(B, H, len(rows))``
    """
    xp = _namespace(q)
    B, H, _, D = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    rows_x = xp.asarray(rows)
    out = xp.empty((B, H, len(rows), D))
    recall = xp.empty((B, H, len(rows)))
    tile_of_row = rows_x // block[0]
    for b in range(B):
        for h in range(H):
            keys = k[b, h // group].astype(xp.float64)
            values = v[b, h // group].astype(xp.float64)
            logits = scale * (q[b, h, rows_x].astype(xp.float64) @ keys.T)
            p = xp.exp(logits - logits.max(axis=1, keepdims=True))
            total = p.sum(axis=1)
            out[b, h] = (p @ values) / total[:, None]
            mask = xp.repeat(kept[b, h][tile_of_row], block[1], axis=1)[:, :Nk]
            recall[b, h] = (p * mask).sum(axis=1) / total
    return out, recall


def _rel_l2(out, exact):
    xp = _namespace(exact)
    diff = out.astype(xp.float64) - exact
    return float(xp.sqrt((diff ** 2).sum() / (exact ** 2).sum()))


def _sample_rows(n_q, block_q, tiles_per_head, seed):
    nq = tile_count(n_q, block_q)
    if tiles_per_head is None or tiles_per_head >= nq:
        return np.arange(n_q)
    picks = np.sort(np.random.default_rng(seed).choice(nq, size=tiles_per_head, replace=False))
    return np.concatenate([np.arange(t * block_q, min((t + 1) * block_q, n_q)) for t in picks])


# ---------------------------------------------------------------------------------------------
# Timing


def _synchronize(x):
    if not isinstance(x, np.ndarray):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def _timed_interleaved(functions, repeat, probe):
    """Median wall time of each of ``functions`` (device synchronised) and its last result.

    The functions run in turn, ``repeat`` rounds, so that a change of machine load between
    rounds hits every one of them alike (the ratios stay meaningful on a shared machine).
    """
    times = [[] for _ in functions]
    results = [None] * len(functions)
    for _ in range(repeat):
        for index, function in enumerate(functions):
            _synchronize(probe)
            start = time.perf_counter()
            results[index] = function()
            _synchronize(probe)
            times[index].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times], results


# ---------------------------------------------------------------------------------------------
# The run


def _trajectory(args):
    if args.trajectory is not None:
        grid = None if args.grid is None else _dims(args.grid, 3, "--grid")
        return workloads.load_trajectory(args.trajectory, layout=args.layout, grid=grid)
    shape = args.shape if args.shape in workloads.SHAPES else _dims(args.shape, 3, "--shape")
    jumps = tuple(int(j) for j in args.jumps.split(",") if j)
    return workloads.denoising_trajectory(
        shape, steps=args.steps, heads=args.heads, head_dim=args.head_dim,
        kinds=tuple(args.kinds.split("+")), dtype=args.dtype, seed=args.seed, jumps=jumps)


def _to_device(x, backend, dtype):
    x = np.ascontiguousarray(x, dtype=workloads._check_dtype(dtype))
    if backend == "cupy":
        import cupy

        return cupy.asarray(x)
    return x


def run(args, argv=None):
    """Run the benchmark of ``args`` (parsed by :func:`add_parser`); returns the summary."""
    block = _dims(args.block, 2, "--block")
    rule = parse_rule(args.skip)
    trajectory = _trajectory(args)
    grid = trajectory.grid
    reuse = PlanReuse(rule, refresh_every=args.refresh_every, dense_steps=args.dense_steps,
                      margin=args.margin, grid=grid, mass_budget=args.mass_budget,
                      kept_tolerance=args.kept_tolerance, order=args.order, block=block)
    options = dict(block=block, backend=args.backend, check_finite=False)
    reuse_options = dict(backend=args.backend, check_finite=False)
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    header = environment(args.backend, argv)
    header.update(trajectory=trajectory.description, reuse=repr(reuse), dtype=args.dtype,
                  block=list(block), skip=args.skip, repeat=args.repeat,
                  load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    records = [header]
    warmed = False
    for step in range(len(trajectory)):
        q, k, v = (_to_device(x, args.backend, args.dtype) for x in trajectory[step])
        scale = q.shape[-1] ** -0.5
        if not warmed:  # first calls compile kernels (Numba, NVRTC): not part of any step
            attention(q, k, v, **options)
            attention(q, k, v, skip=rule, **options)
            copy.deepcopy(reuse).attention(q, k, v, layer=0, step=max(step, args.dense_steps),
                                           **reuse_options)
            warmed = True
        before = reuse
        trials = []

        def reuse_call():
            trial = copy.deepcopy(before)  # each timed call starts from the same state
            trials.append(trial)
            return trial.attention(q, k, v, layer=0, step=step, **reuse_options)

        # The kernel alone on the plan the reuse call uses: what the machinery around it
        # costs. The plan is known only after a reuse call; the first round makes one.
        out, stats = reuse_call()
        trials.clear()
        plan = stats.attention.plan
        kernel_rule = None if stats.dense else rule
        (t_dense, t_rule, t_reuse, t_plan_only), (_, (_, rule_stats), (out, stats), _) = \
            _timed_interleaved([
                lambda: attention(q, k, v, **options),
                lambda: attention(q, k, v, skip=rule, return_stats=True, **options),
                reuse_call,
                lambda: attention(q, k, v, plan=plan, skip=kernel_rule, **options),
            ], args.repeat, q)
        reuse = trials[-1]
        rows = _sample_rows(q.shape[2], block[0], args.error_tiles, seed=step)
        exact, recall = exact_rows(q, k, v, stats.attention.kept, rows, block, scale)
        xp = _namespace(q)
        refreshed = np.asarray(stats.refreshed.get() if xp is not np else stats.refreshed)
        bound = stats.recall_bound
        record = {
            "type": "step", "step": step,
            "sigma": None if trajectory.sigmas is None else float(trajectory.sigmas[step]),
            "dense_step": stats.dense,
            "refreshed_heads": int(refreshed.sum()), "heads": int(refreshed.size),
            "time_dense_s": t_dense, "time_rule_s": t_rule, "time_reuse_s": t_reuse,
            "time_plan_only_s": t_plan_only,
            "plan_density": stats.plan_density, "kept_density": stats.kept_density,
            "rule_kept_density": float(rule_stats.kept.mean()),
            "rel_l2": _rel_l2(out[:, :, xp.asarray(rows)], exact),
            "recall_bound_min": float(bound.min()),
            "recall_min": float(recall.min()), "recall_mean": float(recall.mean()),
            "outside_growth_max": (None if stats.outside_growth is None
                                   else float(stats.outside_growth.max())),
            "error_rows": int(len(rows)),
        }
        ideal = t_dense * record["plan_density"]
        record["time_vs_ideal"] = t_reuse / ideal if ideal > 0 else None
        records.append(record)
        print(f"step {step:3d}  dense {t_dense * 1e3:8.2f} ms  rule {t_rule * 1e3:8.2f} ms  "
              f"reuse {t_reuse * 1e3:8.2f} ms  plan {record['plan_density']:.3f}  "
              f"err {record['rel_l2']:.4f}  refreshed {record['refreshed_heads']}",
              file=sys.stderr)
    summary = _summary(records[1:])
    records.append(summary)
    with open(prefix.with_suffix(".jsonl"), "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    prefix.with_suffix(".md").write_text(markdown_table(records))
    plot_steps(records, prefix)
    return summary


def _summary(steps):
    total = {name: sum(r[name] for r in steps)
             for name in ("time_dense_s", "time_rule_s", "time_reuse_s", "time_plan_only_s")}
    errors = [r["rel_l2"] for r in steps]
    reused = [r for r in steps if not r["dense_step"] and r["refreshed_heads"] == 0]
    return {
        "type": "summary", "steps": len(steps), **total,
        "speedup_vs_dense": total["time_dense_s"] / total["time_reuse_s"],
        "speedup_rule_vs_dense": total["time_dense_s"] / total["time_rule_s"],
        "rel_l2_mean": float(np.mean(errors)), "rel_l2_max": float(np.max(errors)),
        "steps_over_3pct": int(sum(e > 0.03 for e in errors)),
        "head_refreshes": int(sum(r["refreshed_heads"] for r in steps if not r["dense_step"])),
        "steps_with_refresh": int(sum(r["refreshed_heads"] > 0 for r in steps
                                      if not r["dense_step"])),
        "reused_steps": len(reused),
        "plan_density_mean": float(np.mean([r["plan_density"] for r in steps])),
        "reused_time_vs_ideal_median": (float(np.median([r["time_vs_ideal"] for r in reused]))
                                        if reused else None),
        "recall_bound_min": float(min(r["recall_bound_min"] for r in steps)),
        "recall_min": float(min(r["recall_min"] for r in steps)),
    }


def markdown_table(records) -> str:
    """The per-step table and the totals of a run's records, as markdown."""
    header = next(r for r in records if r.get("type") == "environment")
    steps = [r for r in records if r.get("type") == "step"]
    summary = next(r for r in records if r.get("type") == "summary")
    lines = [
        "# Plan reuse along a denoising trajectory",
        "",
        f"* device: {header['device']} ({header['platform']}), backend `{header['backend']}`, "
        f"OMP_NUM_THREADS={header['omp_num_threads'] or 'unset'}",
        f"* date: {header['date']}, commit `{header['git_commit']}`",
        f"* command: `{header['command']}`",
        f"* trajectory: `{json.dumps(header['trajectory'])}`",
        f"* dtype {header['dtype']}, block {header['block']}, rule `{header['skip']}`, "
        f"`{header['reuse']}`, times are medians of {header['repeat']} calls",
        f"* load average at the start (1, 5, 15 min): {header.get('load_average')}",
        "",
        "| step | sigma | kind | refreshed heads | dense ms | rule ms | reuse ms | kernel-only "
        "ms | plan density | kept density | rel L2 | recall bound min | true recall min |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in steps:
        kind = ("dense" if r["dense_step"] else
                "refresh" if r["refreshed_heads"] == r["heads"] else
                "partial" if r["refreshed_heads"] else "reused")
        sigma = "" if r["sigma"] is None else f"{r['sigma']:.3f}"
        lines.append(
            f"| {r['step']} | {sigma} | {kind} | {r['refreshed_heads']}/{r['heads']} | "
            f"{r['time_dense_s'] * 1e3:.2f} | {r['time_rule_s'] * 1e3:.2f} | "
            f"{r['time_reuse_s'] * 1e3:.2f} | {r['time_plan_only_s'] * 1e3:.2f} | "
            f"{r['plan_density']:.3f} | {r['kept_density']:.3f} | {r['rel_l2']:.4f} | "
            f"{r['recall_bound_min']:.4f} | {r['recall_min']:.4f} |")
    s = summary
    ideal = s["reused_time_vs_ideal_median"]
    lines += [
        "",
        "| total | dense s | rule alone s | reuse s | speedup vs dense | rule alone vs dense "
        "| mean rel L2 | max rel L2 | steps > 3% | head refreshes | steps with a refresh | "
        "reused time / ideal (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['steps']} steps | {s['time_dense_s']:.3f} | {s['time_rule_s']:.3f} | "
        f"{s['time_reuse_s']:.3f} | {s['speedup_vs_dense']:.2f}x | "
        f"{s['speedup_rule_vs_dense']:.2f}x | {s['rel_l2_mean']:.4f} | {s['rel_l2_max']:.4f} | "
        f"{s['steps_over_3pct']} | {s['head_refreshes']} | {s['steps_with_refresh']} | "
        f"{'n/a' if ideal is None else f'{ideal:.2f}'} |",
        "",
        "*reuse ms* is the whole `PlanReuse.attention` call (guard, plan, dilation, kernel); "
        "*kernel-only* is `attention` on the plan it used. *ideal* = dense time x plan "
        "density. Errors are against exact float64 attention on "
        f"{steps[0]['error_rows']} query rows per head.",
        "",
    ]
    return "\n".join(lines)


def plot_steps(records, prefix, formats=("png", "svg")):
    """Error and time per step: ``PREFIX.png`` and ``PREFIX.svg``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import _save

    steps = [r for r in records if r.get("type") == "step"]
    x = [r["step"] for r in steps]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(x, [100 * r["rel_l2"] for r in steps], "o-", label="plan reuse")
    top.axhline(1.0, color="grey", ls=":", lw=1)
    top.axhline(3.0, color="grey", ls="--", lw=1)
    refreshes = [r["step"] for r in steps if r["refreshed_heads"] and not r["dense_step"]]
    for step in refreshes:
        top.axvline(step, color="tab:orange", alpha=0.25, lw=3)
        bottom.axvline(step, color="tab:orange", alpha=0.25, lw=3)
    top.set_ylabel("relative L2 error vs dense (%)")
    top.set_title("Plan reuse along a denoising trajectory (orange: refreshes)")
    bottom.plot(x, [1e3 * r["time_dense_s"] for r in steps], "s-", label="dense")
    bottom.plot(x, [1e3 * r["time_rule_s"] for r in steps], "^-", label="rule alone")
    bottom.plot(x, [1e3 * r["time_reuse_s"] for r in steps], "o-", label="plan reuse")
    bottom.set_ylabel("time per step (ms)")
    bottom.set_xlabel("sampler step")
    bottom.legend()
    top.legend()
    figure.tight_layout()
    paths = []
    for fmt in formats:
        path = Path(f"{prefix}.{fmt}")
        _save(figure, path, fmt)
        paths.append(path)
    plt.close(figure)
    return paths
