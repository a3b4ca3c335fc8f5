"""Tables of methods at matched error or matched sparsity, from sweep records.

At matched error the question is what a user buys: within each error budget, the swept setting
of each method that runs fastest against dense (same backend, same run), when the records have
times; without times, the sparsest. Tables say which of the two ranked them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

__all__ = ["matched_error", "matched_sparsity", "markdown_matched_error",
           "markdown_matched_sparsity", "ranking", "RANKINGS"]

DEFAULT_ERRORS = (0.01, 0.03, 0.05)
DEFAULT_SPARSITIES = (0.5, 0.7, 0.9)
RANKINGS = ("auto", "speedup", "sparsity")


def _has_time(record):
    speedup = record.get("speedup")
    return isinstance(speedup, (int, float)) and speedup > 0 and np.isfinite(speedup)


def ranking(runs, rank="auto", sparsity="tile_sparsity"):
    """The record field that ranks ``runs`` at matched error: ``"speedup"`` when ``rank`` is
    ``"speedup"``, or ``"auto"`` and every run has a measured speedup; ``sparsity`` otherwise.
    """
    if rank not in RANKINGS:
        raise ValueError(f"rank must be one of {RANKINGS}, got {rank!r}")
    runs = list(runs)
    timed = bool(runs) and all(_has_time(r) for r in runs)
    if rank == "speedup" and not timed:
        raise ValueError("rank='speedup' needs a measured speedup in every run; these records "
                         "have none (rank by sparsity instead)")
    return "speedup" if rank == "speedup" or (rank == "auto" and timed) else sparsity


def _runs(records):
    """``{workload label: {method: [runs]}}``. Runs of one workload name on different content
    (a file workload overwritten between sweeps) are kept apart, labelled by content hash."""
    groups = defaultdict(lambda: defaultdict(list))
    names = defaultdict(set)
    for record in records:
        if record.get("type") == "run":
            identity = record.get("workload_id", record["workload"])
            groups[identity][record["method"]].append(record)
            names[record["workload"]].add(identity)
    labelled = {}
    for identity, methods in groups.items():
        name = next(iter(methods.values()))[0]["workload"]
        digest = next(iter(methods.values()))[0].get("content_sha256")
        ambiguous = len(names[name]) > 1
        labelled[f"{name} [sha256 {digest[:8]}]" if ambiguous and digest else
                 f"{name} [{identity}]" if ambiguous else name] = methods
    return labelled


def matched_error(records, errors=DEFAULT_ERRORS, metric="rel_l2", sparsity="tile_sparsity",
                  rank="auto"):
    """Per workload, method and error budget: the best run within the budget.

    "Best" is the fastest against dense when every run of the workload has a speedup (or
    ``rank="speedup"``), the sparsest otherwise (or ``rank="sparsity"``); see :func:`ranking`.
    Returns ``{workload: {method: {budget: record or None}}}``. Only swept settings count, so
    the value reported is what the best *swept* setting reached (a finer grid can only
    improve it).
    """
    table = {}
    for workload, methods in _runs(records).items():
        key = ranking([r for runs in methods.values() for r in runs], rank, sparsity)
        table[workload] = {}
        for method, runs in methods.items():
            row = {}
            for budget in errors:
                within = [r for r in runs if r[metric] <= budget]
                row[budget] = max(within, key=lambda r: r[key]) if within else None
            table[workload][method] = row
    return table


def matched_sparsity(records, sparsities=DEFAULT_SPARSITIES, metric="rel_l2",
                     sparsity="tile_sparsity"):
    """Per workload, method and sparsity level: the most accurate run at least that sparse."""
    table = {}
    for workload, methods in _runs(records).items():
        table[workload] = {}
        for method, runs in methods.items():
            row = {}
            for level in sparsities:
                enough = [r for r in runs if r[sparsity] >= level]
                row[level] = min(enough, key=lambda r: r[metric]) if enough else None
            table[workload][method] = row
    return table


def _setting(record):
    return f"{record['parameter']}={record['value']:g}"


def _time(record):
    seconds = record.get("time_s")
    return "" if seconds is None else f", {1e3 * seconds:.3g} ms"


def _render(blocks, fmt):
    """``blocks``: list of (title, header cells, rows of cells) as markdown or reST."""
    if fmt not in ("markdown", "rst"):
        raise ValueError(f"fmt must be 'markdown' or 'rst', got {fmt!r}")
    lines = []
    for title, header, rows in blocks:
        if fmt == "markdown":
            lines += [f"**{title}**", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            lines += [f".. list-table:: {title}", "   :header-rows: 1", ""]
            for row in [header] + rows:
                lines.append("   * - " + row[0])
                lines += [f"     - {cell}" for cell in row[1:]]
        lines.append("")
    return "\n".join(lines)


def _where(runs):
    """``"cpu backend, AMD EPYC ...; dense 12.3 ms"`` for a table title, from what the runs
    carry."""
    parts = []
    backends = sorted({r["backend"] for r in runs if r.get("backend")})
    devices = sorted({r["device"] for r in runs if r.get("device")})
    if backends:
        parts.append(", ".join(backends) + " backend")
    if devices:
        parts.append(", ".join(devices))
    dense = [r["dense_time_s"] for r in runs if r.get("dense_time_s")]
    text = "; ".join(parts)
    if dense:
        text += f"; dense {1e3 * float(np.median(dense)):.3g} ms (median)"
    return text


def markdown_matched_error(records, errors=DEFAULT_ERRORS, metric="rel_l2",
                           sparsity="tile_sparsity", fmt="markdown", rank="auto"):
    """Table: per error budget, each method's best swept setting (see :func:`matched_error`).

    With times, a cell reads ``speedup, time; tile sparsity (FLOP sparsity); setting``;
    without, ``tile sparsity (FLOP sparsity; setting)``. Methods are ordered by the ranking
    quantity at the tightest budget, then the looser ones; "—" means no swept setting of the
    method met the budget. The title says what ranked them.
    """
    blocks = []
    table = matched_error(records, errors, metric, sparsity, rank)
    groups = _runs(records)
    for workload, methods in sorted(table.items()):
        runs = [r for group in groups[workload].values() for r in group]
        key = ranking(runs, rank, sparsity)
        where = _where(runs)
        if key == "speedup":
            title = (f"{workload}: fastest setting per method with {metric} <= budget, ranked "
                     f"by speedup over dense (same backend, same run; {where}); cells: "
                     f"speedup, time; {sparsity.replace('_', ' ')} (FLOP sparsity); setting")
        else:
            why = "as asked" if rank == "sparsity" else "the runs have no times"
            title = (f"{workload}: highest {sparsity.replace('_', ' ')} with {metric} <= "
                     f"budget, ranked by sparsity ({why}{'; ' + where if where else ''}); "
                     f"cells: {sparsity.replace('_', ' ')} (FLOP sparsity; setting)")
        header = ["method"] + [f"{metric} <= {e:g}" for e in errors]

        def order(method):
            row = methods[method]
            return tuple(-(row[b][key] if row[b] is not None else -np.inf) for b in errors)

        rows = []
        for method in sorted(methods, key=lambda m: (order(m), m)):
            cells = [method]
            for budget in errors:
                run = methods[method][budget]
                if run is None:
                    cells.append("—")
                elif key == "speedup":
                    cells.append(f"{run['speedup']:.2f}x{_time(run)}; {run[sparsity]:.1%} "
                                 f"({run['flop_sparsity']:.1%}); {_setting(run)}")
                else:
                    speed = f"; {run['speedup']:.2f}x" if _has_time(run) else ""
                    cells.append(f"{run[sparsity]:.1%} ({run['flop_sparsity']:.1%}; "
                                 f"{_setting(run)}){speed}")
            rows.append(cells)
        blocks.append((title, header, rows))
    return _render(blocks, fmt)


def markdown_matched_sparsity(records, sparsities=DEFAULT_SPARSITIES, metric="rel_l2",
                              sparsity="tile_sparsity", fmt="markdown"):
    """Table: lowest error each method reaches at each sparsity level (setting; speedup when
    the runs have times)."""
    blocks = []
    for workload, methods in sorted(matched_sparsity(records, sparsities, metric,
                                                     sparsity).items()):
        title = f"{workload}: lowest {metric} with {sparsity.replace('_', ' ')} >= level"
        header = ["method"] + [f">= {s:.0%}" for s in sparsities]
        rows = []
        for method in sorted(methods):
            cells = [method]
            for level in sparsities:
                run = methods[method][level]
                speed = f"; {run['speedup']:.2f}x" if run is not None and _has_time(run) else ""
                cells.append("—" if run is None else
                             f"{run[metric]:.2%} ({_setting(run)}{speed})")
            rows.append(cells)
        blocks.append((title, header, rows))
    return _render(blocks, fmt)
