"""``python -m pysparse_attn.bench reuse``: plan reuse along a denoising trajectory.

Per step of a trajectory (synthetic, :func:`pysparse_attn.workloads.denoising_trajectory`, or
a user's capture, :func:`pysparse_attn.workloads.load_trajectory`), one layer is attended
dense, with the in-loop rule alone over every tile, and with :class:`pysparse_attn.PlanReuse`
(guard, plan building and dilation included in its time) in one or more *variants* (settings
of ``PlanReuse``, ``--variant``), all on the same tensors: the trajectory is made once, each
step moved to the device once, and the dense and rule-alone figures are shared by the
variants. Each step records the times, each variant's plan and kept densities, its error
against exact float64 attention, its recall bound and true recall, and which heads refreshed;
a summary record adds the totals.

Outputs per variant: ``PREFIX[-LABEL].jsonl`` (environment header, one record per step,
summary), ``.md`` (the table) and ``.png``/``.svg`` (error and time per step); with variants,
also ``PREFIX-variants.md``, their totals side by side.

Times (:func:`pysparse_attn.bench.timing.time_rounds`): on a GPU, CUDA events around calls
queued without host waits, medians over ``--repeat`` rounds, beside the host's time to issue
each reuse call (a host wait inside the call would show there as the queued work ahead of it).
Errors and true recalls use every query row when the trajectory is small and a seeded sample
of query tiles per head otherwise (``--error-tiles``), in float64 on the inputs' device.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path

import numpy as np

from .. import workloads
from .._api import attention
from .._plan import tile_count
from .._rules import Blasst, Cef, Recall
from .._select import TopK, TopP
from ..reuse import PlanReuse
from .metrics import error_metrics, recall_from_tile_mass, sampled_reference
from .sweep import environment, to_backend
from .timing import time_rounds

__all__ = ["add_parser", "run", "parse_rule", "parse_select", "parse_variant", "markdown_table",
           "markdown_variants", "plot_steps", "read_reuse_runs", "render_reuse_results",
           "VARIANT_KEYS"]

_RULES = {"recall": Recall, "blasst": Blasst, "cef": Cef}


def parse_rule(text):
    """``recall:0.95``, ``blasst:1e-3`` or ``cef:-8.5`` -> the rule object."""
    name, _, value = text.partition(":")
    if name not in _RULES or not value:
        raise ValueError(f"--skip must look like recall:0.95, blasst:1e-3 or cef:-8.5, "
                         f"got {text!r}")
    try:
        return _RULES[name](float(value))
    except ValueError as error:
        raise ValueError(f"--skip {text!r}: {error}") from error


_SELECTORS = {"topk": lambda value: TopK(ratio=value), "topp": TopP}


def parse_select(text):
    """``none``, ``topk:0.3`` (``TopK(ratio=0.3)``) or ``topp:0.95`` -> the selector (or None)
    a refresh runs the rule over."""
    if text.lower() == "none":
        return None
    name, _, value = text.partition(":")
    if name not in _SELECTORS or not value:
        raise ValueError(f"--select must look like none, topk:0.3 or topp:0.95, got {text!r}")
    try:
        return _SELECTORS[name](float(value))
    except ValueError as error:
        raise ValueError(f"--select {text!r}: {error}") from error


def _dims(text, count, name):
    try:
        values = tuple(int(x) for x in text.split("x"))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"{name} must look like {'x'.join(['8'] * count)}, got {text!r}")
    return values


def _optional_int(text):
    return None if text.lower() == "none" else int(text)


def _optional_float(text):
    return None if text.lower() == "none" else float(text)


def _flag(text):
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


#: Settings a ``--variant`` may override: its key -> (argparse destination, parser).
VARIANT_KEYS = {
    "skip": ("skip", str),
    "select": ("select", str),
    "refresh-every": ("refresh_every", _optional_int),
    "dense-steps": ("dense_steps", int),
    "margin": ("margin", int),
    "mass-budget": ("mass_budget", _optional_float),
    "kept-tolerance": ("kept_tolerance", _optional_float),
    "order": ("order", str),
    "rule-in-plan": ("rule_in_plan", _flag),
}
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_variant(text):
    """``LABEL:key=value,key=value`` -> ``(label, {destination: value})``.

    Keys are those of :data:`VARIANT_KEYS` (the reuse options without their dashes);
    ``none`` disables ``refresh-every``, ``mass-budget`` or ``kept-tolerance``;
    ``rule-in-plan`` takes true or false.

    Examples
    --------
    >>> from pysparse_attn.bench.reuse import parse_variant
    >>> parse_variant("late:dense-steps=20,skip=recall:0.8,refresh-every=none")
    ('late', {'dense_steps': 20, 'skip': 'recall:0.8', 'refresh_every': None})
    >>> parse_variant("plain:mass-budget=none,kept-tolerance=none,rule-in-plan=false")[1]
    {'mass_budget': None, 'kept_tolerance': None, 'rule_in_plan': False}
    """
    label, _, settings = text.partition(":")
    if not _LABEL.match(label):
        raise ValueError(f"--variant must look like LABEL:key=value,... with a label of "
                         f"letters, digits, '.', '_' or '-', got {text!r}")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise ValueError(f"--variant {label}: {item!r} is not key=value with a key in "
                             f"{sorted(VARIANT_KEYS)}")
        destination, convert = VARIANT_KEYS[key]
        try:
            overrides[destination] = convert(value)
        except ValueError as error:
            raise ValueError(f"--variant {label}: {key}={value!r}: {error}") from error
    return label, overrides


def add_parser(commands):
    """Register the ``reuse`` subcommand on an argparse subparsers object."""
    parser = commands.add_parser("reuse", help="plan reuse along a denoising trajectory",
                                 description=__doc__.split("\n\n")[1])
    parser.add_argument("-o", "--output", required=True,
                        help="path prefix: writes PREFIX.jsonl, PREFIX.md, PREFIX.png/.svg "
                             "(PREFIX-LABEL.* per variant, and PREFIX-variants.md)")
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
    parser.add_argument("--select", default="none",
                        help="the plan a refresh runs the rule over: none (every tile), "
                             "topk:RATIO or topp:P (default none)")
    parser.add_argument("--refresh-every", type=_optional_int, default=5,
                        help="steps between scheduled refreshes, or none (default 5)")
    parser.add_argument("--dense-steps", type=int, default=2,
                        help="first steps computed dense (default 2)")
    parser.add_argument("--margin", type=int, default=0,
                        help="tiles of dilation around the reused kept set (default 0)")
    parser.add_argument("--mass-budget", type=_optional_float, default=0.02,
                        help="guard: allowed growth of the estimated outside mass, or none "
                             "(default 0.02)")
    parser.add_argument("--kept-tolerance", type=_optional_float, default=0.1,
                        help="guard: allowed move of the kept share inside the plan, or none "
                             "(default 0.1)")
    parser.add_argument("--order", default=None, help="natural, score or peak (default: peak)")
    parser.add_argument("--rule-in-plan", type=_flag, default=True,
                        help="run the rule inside reused plans too (default true); false needs "
                             "--mass-budget none --kept-tolerance none")
    parser.add_argument("--variant", action="append", default=None, metavar="LABEL:KEY=V,...",
                        help="a PlanReuse setting to run beside the others on the same "
                             "tensors: the options above, overridden by KEY=V for KEY in "
                             f"{sorted(VARIANT_KEYS)} (repeatable; default one variant, the "
                             "options as given)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed rounds per step (medians; default 3)")
    parser.add_argument("--error-tiles", type=int, default=None,
                        help="query tiles per head for errors (default: all when small)")
    return parser


# ---------------------------------------------------------------------------------------------
# Inputs: the trajectory, made ahead on a host thread on a GPU run


def _trajectory(args, dtype):
    if args.trajectory is not None:
        grid = None if args.grid is None else _dims(args.grid, 3, "--grid")
        return workloads.load_trajectory(args.trajectory, layout=args.layout, grid=grid)
    shape = args.shape if args.shape in workloads.SHAPES else _dims(args.shape, 3, "--shape")
    jumps = tuple(int(j) for j in args.jumps.split(",") if j)
    return workloads.denoising_trajectory(
        shape, steps=args.steps, heads=args.heads, head_dim=args.head_dim,
        kinds=tuple(args.kinds.split("+")), dtype=dtype, seed=args.seed, jumps=jumps)


class _Prefetcher:
    """Host tensors of the next step made on a thread while the device works on this one.

    Only host work happens on the thread (NumPy); device transfers stay on the caller's
    thread, between timed regions, so they never overlap a timed call.
    """

    def __init__(self, trajectory, ahead: bool):
        self._trajectory = trajectory
        self._ahead = ahead
        self._next = None
        self._thread = None

    def _make(self, step):
        try:
            self._next = (step, self._trajectory[step], None)
        except BaseException as error:  # re-raised on the caller's thread
            self._next = (step, None, error)

    def __call__(self, step):
        if self._thread is None:
            self._make(step)
        else:
            self._thread.join()
        made, tensors, error = self._next
        if error is not None:
            raise error
        assert made == step
        self._thread = None
        if self._ahead and step + 1 < len(self._trajectory):
            self._thread = threading.Thread(target=self._make, args=(step + 1,), daemon=True)
            self._thread.start()
        return tensors


def _sample_rows(n_q, block_q, tiles_per_head, seed):
    nq = tile_count(n_q, block_q)
    if tiles_per_head is None or tiles_per_head >= nq:
        return np.arange(n_q)
    picks = np.sort(np.random.default_rng(seed).choice(nq, size=tiles_per_head, replace=False))
    return np.concatenate([np.arange(t * block_q, min((t + 1) * block_q, n_q)) for t in picks])


def _host(x):
    return np.asarray(x.get() if hasattr(x, "get") else x)


# ---------------------------------------------------------------------------------------------
# The run


def _variant_specs(args):
    specs = [parse_variant(text) for text in args.variant] if args.variant else [(None, {})]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--variant labels must differ, got {labels}")
    return specs


def _variants(specs, args, grid, block):
    """``[(label or None, settings dict, PlanReuse)]`` of the command line."""
    base = {destination: getattr(args, destination) for destination, _ in VARIANT_KEYS.values()}
    variants = []
    for label, overrides in specs:
        settings = dict(base, **overrides)
        reuse = PlanReuse(parse_rule(settings["skip"]), select=parse_select(settings["select"]),
                          refresh_every=settings["refresh_every"],
                          dense_steps=settings["dense_steps"], margin=settings["margin"],
                          grid=grid, mass_budget=settings["mass_budget"],
                          kept_tolerance=settings["kept_tolerance"], order=settings["order"],
                          block=block, rule_in_plan=settings["rule_in_plan"])
        variants.append((label, settings, reuse))
    return variants


def _prefix(prefix: Path, label):
    return prefix if label is None else prefix.with_name(f"{prefix.name}-{label}")


def run(args, argv=None):
    """Run the benchmark of ``args`` (parsed by :func:`add_parser`); returns the summary of
    the only variant, or ``{label: summary}`` with ``--variant``."""
    block = _dims(args.block, 2, "--block")
    rule = parse_rule(args.skip)
    if isinstance(args.repeat, bool) or not isinstance(args.repeat, int) or args.repeat < 1:
        raise ValueError(f"--repeat must be a positive int, got {args.repeat!r}")
    specs = _variant_specs(args)  # command-line mistakes before any work
    for _, overrides in specs:
        parse_rule(overrides.get("skip", args.skip))
        parse_select(overrides.get("select", args.select))
    on_gpu = args.backend == "cupy"
    # 16-bit tensors for the GPU are made in float32 and rounded there (exactly what the host
    # conversion gives, without its cost).
    host_dtype = "float32" if on_gpu and args.dtype in ("bfloat16", "float16") else args.dtype
    trajectory = _trajectory(args, host_dtype)
    grid = trajectory.grid
    variants = _variants(specs, args, grid, block)
    options = dict(block=block, backend=args.backend, check_finite=False)
    reuse_options = dict(backend=args.backend, check_finite=False)
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    description = dict(trajectory.description)
    if "dtype" in description:
        description["dtype"] = args.dtype
    if "heads" not in description:  # a capture: its shape from the first step
        q0 = trajectory[0][0]
        description.update(batch=int(q0.shape[0]), heads=int(q0.shape[1]),
                           tokens=int(q0.shape[2]), head_dim=int(q0.shape[3]))
    base_header = environment(args.backend, argv)
    base_header.update(trajectory=description, dtype=args.dtype, block=list(block),
                       repeat=args.repeat,
                       load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    records, sinks = {}, {}
    for label, settings, reuse in variants:
        header = dict(base_header, variant=label, skip=settings["skip"], reuse=repr(reuse))
        records[label] = [header]
        # Written as they come: a run stopped early (a time limit) keeps its finished steps.
        sinks[label] = open(_prefix(prefix, label).with_suffix(".jsonl"), "w")
        _write(sinks[label], header)
    tensors_of = _Prefetcher(trajectory, ahead=on_gpu)
    for step in range(len(trajectory)):
        q, k, v = (to_backend(x, args.backend, args.dtype) for x in tensors_of(step))
        scale = q.shape[-1] ** -0.5
        if step == 0:  # first calls compile kernels (Numba, NVRTC): not part of any step
            attention(q, k, v, **options)
            attention(q, k, v, skip=rule, **options)
            for _, settings, reuse in variants:
                reuse.fork().attention(q, k, v, layer=0,
                                       step=max(step, settings["dense_steps"]), **reuse_options)
        # Per variant: one untimed call from a fork gives the plan the kernel-only figure
        # runs; each timed call starts from its own fork of the same state.
        functions = [lambda: attention(q, k, v, **options),
                     lambda: attention(q, k, v, skip=rule, return_stats=True, **options)]
        forks = []
        for _, settings, reuse in variants:
            _, probe = reuse.fork().attention(q, k, v, layer=0, step=step, **reuse_options)
            # The rule the call ran: none on dense steps, nor between refreshes without it.
            ran_rule = not probe.dense and (reuse.rule_in_plan
                                            or bool(_host(probe.refreshed).any()))
            plan = probe.attention.plan
            kernel_rule = parse_rule(settings["skip"]) if ran_rule else None
            trials = [reuse.fork() for _ in range(args.repeat)]
            forks.append(trials)
            functions.append([lambda t=t: t.attention(q, k, v, layer=0, step=step,
                                                      **reuse_options) for t in trials])
            functions.append(lambda plan=plan, r=kernel_rule: attention(
                q, k, v, plan=plan, skip=r, **options))
        seconds, results, host_seconds = time_rounds(functions, args.repeat, args.backend,
                                                     warmup=False)
        t_dense, t_rule = seconds[0], seconds[1]
        rule_stats = results[1][1]
        rows = _sample_rows(q.shape[2], block[0], args.error_tiles, seed=step)
        reference = sampled_reference(q, k, v, block, rows, scale=scale, precision="float64")
        rule_kept_density = float(rule_stats.kept.mean())
        for index, (label, settings, _) in enumerate(variants):
            reuse = forks[index][-1]  # the state after this step (every fork is the same)
            variants[index] = (label, settings, reuse)
            out, stats = results[2 + 2 * index]
            record = _step_record(
                step, trajectory, stats, out, reference, t_dense, t_rule,
                seconds[2 + 2 * index], host_seconds[2 + 2 * index], seconds[3 + 2 * index],
                rule_kept_density, len(rows))
            records[label].append(record)
            _write(sinks[label], record)
            print(f"step {step:3d} {label or '':>10}  dense {t_dense * 1e3:8.2f} ms  "
                  f"rule {t_rule * 1e3:8.2f} ms  reuse {record['time_reuse_s'] * 1e3:8.2f} ms  "
                  f"plan {record['plan_density']:.3f}  err {record['rel_l2']:.4f}  "
                  f"refreshed {record['refreshed_heads']}", file=sys.stderr)
    summaries = {}
    for label, _, _ in variants:
        summary = _summary(records[label][1:])
        records[label].append(summary)
        summaries[label] = summary
        _write(sinks[label], summary)
        sinks[label].close()
        path = _prefix(prefix, label)
        path.with_suffix(".md").write_text(markdown_table(records[label]))
        plot_steps(records[label], path)
    if args.variant:
        Path(f"{prefix}-variants.md").write_text(markdown_variants(records))
        return summaries
    return summaries[None]


def _write(sink, record):
    sink.write(json.dumps(record) + "\n")
    sink.flush()


def _step_record(step, trajectory, stats, out, reference, t_dense, t_rule, t_reuse, host_reuse,
                 t_kernel, rule_kept_density, error_rows):
    refreshed = _host(stats.refreshed)
    recall = recall_from_tile_mass(reference, stats.attention.kept)
    errors = error_metrics(reference.restrict(out), reference.out)
    record = {
        "type": "step", "step": step,
        "sigma": None if trajectory.sigmas is None else float(trajectory.sigmas[step]),
        "dense_step": stats.dense,
        "refreshed_heads": int(refreshed.sum()), "heads": int(refreshed.size),
        "time_dense_s": t_dense, "time_rule_s": t_rule, "time_reuse_s": t_reuse,
        "host_reuse_s": host_reuse, "time_plan_only_s": t_kernel,
        "plan_density": stats.plan_density, "kept_density": stats.kept_density,
        "rule_kept_density": rule_kept_density,
        "rel_l2": errors["rel_l2"], "rel_l2_worst_head": errors["rel_l2_worst_head"],
        "recall_bound_min": float(stats.recall_bound.min()),
        "recall_min": float(recall.min()), "recall_mean": float(recall.mean()),
        "outside_growth_max": (None if stats.outside_growth is None
                               else float(stats.outside_growth.max())),
        "error_rows": int(error_rows),
    }
    density = record["plan_density"]
    # Two ideals: the dense kernel's speed per tile, and the rule kernel's own (the reused
    # steps run the rule inside the plan).
    record["time_vs_ideal"] = t_reuse / (t_dense * density) if density > 0 else None
    record["time_vs_rule_ideal"] = t_reuse / (t_rule * density) if density > 0 else None
    return record


def _summary(steps):
    total = {name: sum(r[name] for r in steps)
             for name in ("time_dense_s", "time_rule_s", "time_reuse_s", "time_plan_only_s")}
    errors = [r["rel_l2"] for r in steps]
    reused = [r for r in steps if not r["dense_step"] and r["refreshed_heads"] == 0]

    def median(key):
        return float(np.median([r[key] for r in reused])) if reused else None

    return {
        "type": "summary", "steps": len(steps), **total,
        "speedup_vs_dense": total["time_dense_s"] / total["time_reuse_s"],
        "speedup_rule_vs_dense": total["time_dense_s"] / total["time_rule_s"],
        "rel_l2_mean": float(np.mean(errors)), "rel_l2_max": float(np.max(errors)),
        "steps_over_3pct": int(sum(e > 0.03 for e in errors)),
        "head_refreshes": int(sum(r["refreshed_heads"] for r in steps if not r["dense_step"])),
        "steps_with_refresh": int(sum(r["refreshed_heads"] > 0 for r in steps
                                      if not r["dense_step"])),
        "dense_steps": int(sum(r["dense_step"] for r in steps)),
        "reused_steps": len(reused),
        "plan_density_mean": float(np.mean([r["plan_density"] for r in steps])),
        "reused_time_vs_ideal_median": median("time_vs_ideal"),
        "reused_time_vs_rule_ideal_median": median("time_vs_rule_ideal"),
        "reused_time_vs_kernel_median": (float(np.median([
            r["time_reuse_s"] / r["time_plan_only_s"] for r in reused])) if reused else None),
        "reuse_host_s_max": float(max(r.get("host_reuse_s", 0.0) for r in steps)),
        "recall_bound_min": float(min(r["recall_bound_min"] for r in steps)),
        "recall_min": float(min(r["recall_min"] for r in steps)),
    }


def _kind(r):
    return ("dense" if r["dense_step"] else
            "refresh" if r["refreshed_heads"] == r["heads"] else
            "partial" if r["refreshed_heads"] else "reused")


def _ms(seconds):
    return "" if seconds is None else f"{seconds * 1e3:.2f}"


def _ratio(value):
    return "n/a" if value is None else f"{value:.2f}"


def _header_lines(header):
    variant = header.get("variant")
    return [
        f"* device: {header['device']} ({header['platform']}), backend `{header['backend']}`, "
        f"OMP_NUM_THREADS={header['omp_num_threads'] or 'unset'}",
        f"* date: {header['date']}, commit `{header['git_commit']}`",
        f"* command: `{header['command']}`" + (f", variant `{variant}`" if variant else ""),
        f"* trajectory: `{json.dumps(header['trajectory'])}`",
        f"* dtype {header['dtype']}, block {header['block']}, rule `{header['skip']}`, "
        f"`{header['reuse']}`, times are medians of {header['repeat']} rounds",
        f"* load average at the start (1, 5, 15 min): {header.get('load_average')}",
    ]


_NOTES = [
    "*reuse ms* is the whole `PlanReuse.attention` call (guard, plan, dilation, kernel), "
    "device time of queued calls on a GPU; *host ms* the host's time to issue it (a host wait "
    "inside the call would show there as the queued dense and rule-alone calls ahead of it); "
    "*kernel-only* is `attention` on the plan it used. *ideal* = dense time x plan density; "
    "*rule ideal* = rule-alone time x plan density (the kernel's own speed with the rule "
    "running).",
]


def markdown_table(records) -> str:
    """The per-step table and the totals of a run's records, as markdown."""
    header = next(r for r in records if r.get("type") == "environment")
    steps = [r for r in records if r.get("type") == "step"]
    summary = next(r for r in records if r.get("type") == "summary")
    lines = ["# Plan reuse along a denoising trajectory", "", *_header_lines(header), "",
             "| step | sigma | kind | refreshed heads | dense ms | rule ms | reuse ms | host ms | "
             "kernel-only ms | plan density | kept density | rel L2 | recall bound min | "
             "true recall min |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in steps:
        sigma = "" if r["sigma"] is None else f"{r['sigma']:.3f}"
        lines.append(
            f"| {r['step']} | {sigma} | {_kind(r)} | {r['refreshed_heads']}/{r['heads']} | "
            f"{_ms(r['time_dense_s'])} | {_ms(r['time_rule_s'])} | {_ms(r['time_reuse_s'])} | "
            f"{_ms(r.get('host_reuse_s'))} | {_ms(r['time_plan_only_s'])} | "
            f"{r['plan_density']:.3f} | {r['kept_density']:.3f} | {r['rel_l2']:.4f} | "
            f"{r['recall_bound_min']:.4f} | {r['recall_min']:.4f} |")
    lines += ["", *_totals_table([(None, summary)]), "", *_NOTES,
              f"Errors are against exact float64 attention on {steps[0]['error_rows']} query "
              "rows per head.", ""]
    return "\n".join(lines)


def _totals_table(summaries):
    lines = ["| variant | steps | dense s | rule alone s | reuse s | speedup vs dense | "
             "rule alone vs dense | mean rel L2 | max rel L2 | steps > 3% | dense steps | "
             "head refreshes | steps with a refresh | reused steps | mean plan density | "
             "reused / ideal | reused / rule ideal | reused / kernel-only | max host ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---:|---:|---:|"]
    for label, s in summaries:
        lines.append(
            f"| {label or 'total'} | {s['steps']} | {s['time_dense_s']:.3f} | "
            f"{s['time_rule_s']:.3f} | {s['time_reuse_s']:.3f} | "
            f"{s['speedup_vs_dense']:.2f}x | {s['speedup_rule_vs_dense']:.2f}x | "
            f"{s['rel_l2_mean']:.4f} | {s['rel_l2_max']:.4f} | {s['steps_over_3pct']} | "
            f"{s.get('dense_steps', '')} | {s['head_refreshes']} | {s['steps_with_refresh']} | "
            f"{s['reused_steps']} | {s['plan_density_mean']:.3f} | "
            f"{_ratio(s['reused_time_vs_ideal_median'])} | "
            f"{_ratio(s.get('reused_time_vs_rule_ideal_median'))} | "
            f"{_ratio(s.get('reused_time_vs_kernel_median'))} | "
            f"{_ms(s.get('reuse_host_s_max'))} |")
    return lines


def markdown_variants(records_by_label) -> str:
    """The totals of every variant of one run side by side, with each one's settings."""
    first = next(iter(records_by_label.values()))
    header = first[0]
    lines = ["# Plan reuse variants on one trajectory", "", *_header_lines(
        dict(header, variant=None, skip="per variant", reuse="per variant")), ""]
    summaries = []
    for label, records in records_by_label.items():
        head = records[0]
        lines.append(f"* `{label}`: rule `{head['skip']}`, `{head['reuse']}`")
        summaries.append((label, next(r for r in records if r.get("type") == "summary")))
    lines += ["", *_totals_table(summaries), "", *_NOTES,
              "Medians of the ratios are over the reused steps (no head refreshed). "
              "Every variant ran on the same tensors, with the same dense and rule-alone calls.",
              ""]
    return "\n".join(lines)


def read_reuse_runs(folder, pattern="reuse-*.jsonl"):
    """``[(header, summary, path)]`` of the reuse result files (``pattern``, default
    ``reuse-*.jsonl``) in ``folder``, newest first, GPU runs before CPU ones."""
    runs = []
    for path in sorted(Path(folder).glob(pattern)):
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        header = next((r for r in records if r.get("type") == "environment"), None)
        summary = next((r for r in records if r.get("type") == "summary"), None)
        if header is not None and summary is not None:
            runs.append((header, summary, path))
    runs.sort(key=lambda run: run[0].get("date", ""), reverse=True)
    runs.sort(key=lambda run: run[0].get("backend") != "cupy")
    return runs


def render_reuse_results(folder, pattern="reuse-*.jsonl",
                         title="Plan reuse along the synthetic trajectory",
                         command="python -m pysparse_attn.bench reuse") -> str:
    """reST: one table of the reuse runs in ``folder`` (``pattern``; GPU first), each with its
    device, date, variant and settings; a sentence naming ``command`` when there are none."""
    runs = read_reuse_runs(folder, pattern)
    if not runs:
        return (f"No plan-reuse results are in ``bench/results/`` yet: "
                f"``{command}`` writes them.\n")
    lines = [f".. list-table:: {title} (totals over the steps)",
             "   :header-rows: 1", "",
             "   * - device, date", "     - run", "     - shape (B, H, N, D), dtype, tiles",
             "     - steps", "     - speedup vs dense", "     - rule alone vs dense",
             "     - mean / max rel. L2", "     - mean plan density",
             "     - reused / ideal (median)"]
    for header, s, path in runs:
        trajectory = header.get("trajectory", {})
        grid = trajectory.get("grid")
        tokens = int(np.prod(grid)) if grid else "?"
        shape = (f"(1, {trajectory.get('heads', '?')}, {tokens}, "
                 f"{trajectory.get('head_dim', '?')}), {header.get('dtype')}, "
                 f"{'x'.join(map(str, header.get('block', [])))}")
        lines += [f"   * - {header['device']}, {header['date'][:10]}",
                  f"     - ``{path.relative_to(folder).with_suffix('')}``: "
                  f"``{header.get('reuse', '')}``",
                  f"     - {shape}", f"     - {s['steps']}",
                  f"     - {s['speedup_vs_dense']:.2f}x",
                  f"     - {s['speedup_rule_vs_dense']:.2f}x",
                  f"     - {s['rel_l2_mean']:.2%} / {s['rel_l2_max']:.2%}",
                  f"     - {s['plan_density_mean']:.3f}",
                  f"     - {_ratio(s['reused_time_vs_ideal_median'])}"]
    return "\n".join(lines) + "\n"


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
