"""Measured results in one machine-readable format, and the tables the docs build makes of them.

Format: JSON lines, one object per measured (method, setting), with ``"format":
"pysparse_attn.result/1"`` and the fields of :data:`RESULT_FIELDS`. Files in
``bench/results/*.jsonl`` holding such lines are read by the documentation build
(``docs/conf.py``), which renders :func:`render_method_tables` into "Choosing a method": no
figure there is typed by hand. Lines of other formats in the same folder are ignored.

Produce records with ``python bench/cpu.py`` (CPU) or, on any backend, with a sweep and
:func:`export_sweep` (``python -m pysparse_attn.bench sweep ... --grid docs`` then
``python -m pysparse_attn.bench export``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

__all__ = ["RESULT_FORMAT", "RESULT_FIELDS", "DOCS_GRID", "method_label", "export_sweep",
           "write_results", "read_results", "render_method_tables", "read_finetune_runs",
           "render_finetune_results", "render_forward_comparisons", "git_commit"]

RESULT_FORMAT = "pysparse_attn.result/1"

#: Every field of a result record and what it holds.
RESULT_FIELDS = {
    "format": "always RESULT_FORMAT",
    "device": "the machine: GPU name, or CPU model and core count",
    "device_kind": '"gpu" or "cpu"',
    "backend": "the pysparse_attn backend timed (cpu, cupy, reference)",
    "date": "UTC date and time of the measurement, ISO 8601",
    "commit": "git commit of the code measured (+dirty when it had local changes)",
    "command": "the command that produced the measurement",
    "workload": "the workload's name (a sweep workload, e.g. mixed-mid)",
    "shape": "[B, H, N, D] of q",
    "dtype": "dtype of q, k, v",
    "block": "[Bq, Bk] tile sizes",
    "method": "public API spelling of the method, e.g. Recall",
    "settings": "its setting, e.g. R=0.95, order=peak",
    "time_ms": "median wall time of the call, milliseconds",
    "dense_ms": "median wall time of dense attention, same backend, same run",
    "speedup": "dense_ms / time_ms",
    "sparsity": "share of key tiles whose P.V was skipped",
    "flop_sparsity": "share of dense-equivalent FLOPs saved",
    "error": "relative L2 error of the output against the reference",
    "reference": "what the error and recall are measured against",
    "recall_min": "smallest exact recall (kept share of softmax mass) over the rows",
    "recall_mean": "mean exact recall over the rows",
}
#: Optional fields: ``note`` (a sentence on the conditions, e.g. the machine's load).
OPTIONAL_FIELDS = ("note",)

#: A few settings per sweep method for the measured tables of the docs: from nearly exact to
#: where the method's error passes a few percent on the bundled video-like workloads.
DOCS_GRID = {
    "blasst-peak": (1e-3, 1e-2),
    "cef": (-8.0, -6.0),
    "recall-peak": (0.95, 0.8, 0.5),
    "recall-exact": (0.95,),
    "topk": (0.3, 0.1),
    "topp": (0.95, 0.9),
    "sla": (0.3, 0.1),
    "sla-fit": (0.1,),
}

# Sweep method name -> (method as the public API spells it, settings besides the swept one).
_LABELS = {
    "blasst": ("Blasst", "order=natural"),
    "blasst-peak": ("Blasst", "order=peak"),
    "cef": ("Cef", "order=natural"),
    "cef-peak": ("Cef", "order=peak"),
    "recall-natural": ("Recall", "order=natural"),
    "recall-score": ("Recall", "order=score"),
    "recall-peak": ("Recall", "order=peak"),
    "recall-exact": ("Recall(exact=True)", "order=peak"),
    "topk": ("TopK", "plan alone"),
    "topp": ("TopP", "plan alone"),
    "sla": ("sla_attention, W = 0", "negligible=0"),
    "sla-fit": ("sla_attention, W fitted", "negligible=0, least squares in-sample"),
}
_PARAMETER_NAMES = {"target": "R"}


def method_label(run: dict):
    """``(method, settings)`` of a sweep run record, in the public API's spelling."""
    method, extra = _LABELS.get(run["method"], (run["method"], ""))
    parameter = _PARAMETER_NAMES.get(run["parameter"], run["parameter"])
    settings = f"{parameter}={run['value']:g}" + (f", {extra}" if extra else "")
    return method, settings


def export_sweep(records):
    """Result records (:data:`RESULT_FIELDS`) of the run records of a sweep file.

    Each run takes its commit and command from the environment header before it.
    """
    results, header = [], {}
    for record in records:
        if record.get("type") == "environment":
            header = record
            continue
        if record.get("type") != "run":
            continue
        method, settings = method_label(record)
        backend = record.get("backend", header.get("backend", ""))
        results.append({
            "format": RESULT_FORMAT,
            "device": record.get("device", header.get("device", "unknown")),
            "device_kind": "gpu" if backend == "cupy" else "cpu",
            "backend": backend,
            "date": record.get("date", header.get("date", "")),
            "commit": header.get("git_commit", "unknown"),
            "command": header.get("command", ""),
            "workload": record["workload"],
            "shape": record["shape_bhnd"],
            "dtype": record["dtype"],
            "block": record["block"],
            "method": method,
            "settings": settings,
            "time_ms": 1e3 * record["time_s"],
            "dense_ms": 1e3 * record["dense_time_s"],
            "speedup": record["speedup"],
            "sparsity": record["tile_sparsity"],
            "flop_sparsity": record["flop_sparsity"],
            "error": record["rel_l2"],
            "reference": record.get("reference", "float64, every row"),
            "recall_min": record["recall_min"],
            "recall_mean": record["recall_mean"],
        })
    return results


def write_results(path, results):
    """Append result records to a JSONL file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as sink:
        for result in results:
            missing = set(RESULT_FIELDS) - set(result)
            if missing:
                raise ValueError(f"result record lacks {sorted(missing)}")
            sink.write(json.dumps(result) + "\n")


def read_results(paths):
    """The result records (format :data:`RESULT_FORMAT`) in the given JSONL files or folders
    (a folder means its ``*.jsonl`` files); other lines are skipped."""
    files = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    results = []
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("format") == RESULT_FORMAT:
                results.append(record)
    return results


def _workload(name):
    """``mixed-mid`` and what it is, for a named synthetic workload of the sweep."""
    from .sweep import WORKLOADS

    spec = WORKLOADS.get(name)
    if spec is None:
        return f"``{name}``"
    grid = spec["shape"] if isinstance(spec["shape"], str) else " x ".join(map(str,
                                                                                spec["shape"]))
    return (f"``{name}`` (:func:`~pysparse_attn.workloads.video_qkv`, latent grid {grid}, "
            f"heads {', '.join(spec['kinds'])})")


def _shape(shape):
    B, H, N, D = shape
    return f"B = {B}, H = {H}, N = {N:,}, D = {D}"


def _cell(text):
    """reST-safe table cell text."""
    return str(text).replace("*", r"\*").replace("|", r"\|")


def _error(value):
    if value == 0:
        return "0 (exact)"
    return f"{value:.1e}" if value < 1e-4 else f"{value:.2%}"


def render_method_tables(results, kinds=(("gpu", "GPU"), ("cpu", "CPU"))):
    """reST: per device kind, per measurement (device, date, commit, workload, shape, dtype),
    one table per method with time, speedup over dense, sparsity, error and recall.

    A kind without results gets a sentence saying so, and how to produce them.
    """
    lines = []
    for kind, title in kinds:
        lines += [f".. rubric:: {title}", ""]
        mine = [r for r in results if r.get("device_kind") == kind]
        if not mine:
            lines += [f"No {title} results are in ``bench/results/`` yet. They appear here when "
                      "a result file is added there (see :mod:`pysparse_attn.bench.results` "
                      "for the format and how to produce one).", ""]
            continue
        sets = defaultdict(list)
        for r in mine:
            sets[(r["device"], r["date"][:10], r["commit"], r["command"], r["workload"],
                  tuple(r["shape"]), r["dtype"], tuple(r["block"]), r["backend"],
                  r["reference"])].append(r)
        for (device, date, commit, command, workload, shape, dtype, block, backend,
             reference), rows in sorted(sets.items(), key=lambda item: item[0][1],
                                        reverse=True):
            dense = sorted(r["dense_ms"] for r in rows)[len(rows) // 2]
            lines += [
                f"**{device}**, measured {date} (commit ``{commit}``): workload "
                f"{_workload(workload)}, {_shape(shape)}, {dtype}, {block[0]}x{block[1]} tiles, "
                f"``{backend}`` backend; dense attention {dense:.4g} ms (median over the runs). "
                f"Speedup is over a dense call made alternately with each run; error and "
                f"recall are measured against exact dense attention ({reference}). Command: "
                f"``{command}``."
                + "".join(sorted({f" {r['note']}." for r in rows if r.get("note")})), ""]
            by_method = defaultdict(list)
            for r in rows:
                by_method[r["method"]].append(r)
            for method, entries in by_method.items():
                lines += [f".. list-table:: {_cell(method)} ({device}, {date})",
                          "   :header-rows: 1", "",
                          "   * - setting", "     - time (ms)", "     - speedup",
                          "     - tile sparsity", "     - FLOP sparsity",
                          "     - rel. L2 error", "     - recall min / mean"]
                for r in sorted(entries, key=lambda r: r["error"]):
                    lines += [f"   * - {_cell(r['settings'])}", f"     - {r['time_ms']:.4g}",
                              f"     - {r['speedup']:.2f}x", f"     - {r['sparsity']:.1%}",
                              f"     - {r['flop_sparsity']:.1%}", f"     - {_error(r['error'])}",
                              f"     - {r['recall_min']:.3f} / {r['recall_mean']:.3f}"]
                lines.append("")
    return "\n".join(lines)


def read_finetune_runs(folder):
    """The records of ``bench/finetune_sla.py`` (``finetune-sla-*.json``) under ``folder``, at
    any depth, GPU runs first, then by date."""
    records = []
    for path in sorted(Path(folder).rglob("finetune-sla-*.json")):
        record = json.loads(path.read_text())
        record["path"] = str(path.relative_to(folder))
        records.append(record)
    return sorted(records, key=lambda r: ("cpu" in r.get("device_name", "cpu").lower(),
                                          r.get("date", "")))


def render_finetune_results(folder):
    """reStructuredText: one row per fine-tuning run of ``folder`` (device, date, size, steps
    and peak learning rate, the output error vs the dense model before and after, their
    ratio, step times)."""
    runs = read_finetune_runs(folder)
    if not runs:
        return "No fine-tuning runs are recorded yet (``bench/finetune_sla.py --out DIR``)."
    header = ["device, date, commit", "tokens, layers x heads x dim", "sparsity",
              "fine-tune steps, peak lr", "rel. L2 vs dense: before / after", "after / before",
              "step ms: dense / SLA", "record"]
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines += ["   * - " + header[0]] + [f"     - {cell}" for cell in header[1:]]
    for run in runs:
        config, finetune = run["config"], run["finetune"]
        before, after = run["sla_before"]["rel_l2_vs_dense"], run["sla_after"]["rel_l2_vs_dense"]
        date = run["date"]
        when = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) >= 8 else date
        lines += [f"   * - {run['device_name']}, {when}, ``{run['commit']}``",
                  f"     - {run['tokens']}, {config['layers']} x {config['heads']} x "
                  f"{config['head_dim']}",
                  f"     - {run['measured_sparsity']:.1%}",
                  f"     - {finetune['steps_run']}, {config['lr_finetune']:g}",
                  f"     - {before:.4f} / {after:.4f}",
                  f"     - {after / before:.3f}",
                  f"     - {run['dense']['step_ms']:.1f} / {finetune['step_ms']:.1f}",
                  f"     - ``{run['path']}``"]
    return "\n".join(lines) + "\n"


def render_forward_comparisons(folder, mode="compare"):
    """reStructuredText: one table per run of ``bench/forward_ablation.py --mode MODE``
    (``forward-MODE-*.jsonl`` at any depth of ``folder``; ``compare``: the forward kernels,
    ``schedule``: the warp-specialised kernel's consumer schedules), newest first: each case's
    time per kernel or schedule, with the share of tiles skipped, the speedup over that
    column's own dense time and its rate as a share of cuDNN's in the same process."""
    paths = sorted(Path(folder).rglob(f"forward-{mode}-*.jsonl"), key=lambda p: p.name,
                   reverse=True)
    if not paths:
        what = "forward comparisons" if mode == "compare" else f"forward {mode} runs"
        return f"No {what} are recorded yet (``bench/forward_ablation.py --mode {mode}``)."
    blocks = []
    for path in paths:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not records:
            continue
        first = records[0]
        kernels = list(dict.fromkeys(r["impl"] for r in records if r["impl"] != "torch sdpa cudnn"))
        cudnn = [r["ms"] for r in records if r["impl"] == "torch sdpa cudnn" and r.get("ms")]
        date = first["date"]
        B, H, N, D = first["shape"]
        blocks += [f"**{first['device']}**, {date[:4]}-{date[4:6]}-{date[6:8]}, commit "
                   f"``{first['commit']}``, {first['dtype']}, B={B} H={H} N={N:,} D={D}, tiles "
                   f"{first['block'][0]}x{first['block'][1]}, {first['timing']}"
                   + (f"; torch SDPA cuDNN {cudnn[0]:.2f} ms in the same process" if cudnn
                      else "") + f" (``{path.relative_to(folder)}``).", "",
                   ".. list-table::", "   :header-rows: 1", "",
                   "   * - case", "     - skipped"]
        blocks += [f"     - ``{kernel}``: ms (speedup over its own dense; dense-equivalent "
                   "rate as a share of cuDNN's)" for kernel in kernels]
        by_case = defaultdict(dict)
        for r in records:
            by_case[r["what"]][r["impl"]] = r
        for case, row in by_case.items():
            if not any(kernel in row for kernel in kernels):
                continue
            skipped = next((row[k].get("skipped") for k in kernels if k in row), None)
            blocks += [f"   * - {case}",
                       f"     - {'' if skipped is None else f'{skipped:.1%}'}"]
            for kernel in kernels:
                r = row.get(kernel, {})
                if r.get("ms") is None:
                    blocks.append("     - failed" if r else "     -")
                    continue
                notes = [f"{r[key]:.2f}x" if key == "speedup_vs_own_dense" else f"{r[key]:.0%}"
                         for key in ("speedup_vs_own_dense", "of_cudnn") if r.get(key)]
                blocks.append(f"     - {r['ms']:.3f}" + (f" ({', '.join(notes)})" if notes
                                                        else ""))
        blocks.append("")
    return "\n".join(blocks)


def git_commit() -> str:
    """The short commit of the code measured, ``+dirty`` when tracked files have local changes
    (``"uncommitted"`` outside a git checkout): the ``commit`` field of every record."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, timeout=10)
        if commit.returncode != 0:
            return "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
