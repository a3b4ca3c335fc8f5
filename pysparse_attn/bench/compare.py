"""Markdown tables of methods at matched error or matched sparsity, from sweep records."""

from __future__ import annotations

from collections import defaultdict

__all__ = ["matched_error", "matched_sparsity", "markdown_matched_error",
           "markdown_matched_sparsity"]

DEFAULT_ERRORS = (0.01, 0.03, 0.05)
DEFAULT_SPARSITIES = (0.5, 0.7, 0.9)


def _runs(records):
    groups = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.get("type") == "run":
            groups[record["workload"]][record["method"]].append(record)
    return groups


def matched_error(records, errors=DEFAULT_ERRORS, metric="rel_l2", sparsity="tile_sparsity"):
    """Per workload, method and error budget: the sparsest run within the budget.

    Returns ``{workload: {method: {budget: record or None}}}``. Only swept settings count, so
    the sparsity reported is what the best *swept* setting reached (a finer grid can only
    raise it).
    """
    table = {}
    for workload, methods in _runs(records).items():
        table[workload] = {}
        for method, runs in methods.items():
            row = {}
            for budget in errors:
                within = [r for r in runs if r[metric] <= budget]
                row[budget] = max(within, key=lambda r: r[sparsity]) if within else None
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


def _best(row, budget, sparsity):
    run = row[budget]
    return -1.0 if run is None else run[sparsity]


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


def markdown_matched_error(records, errors=DEFAULT_ERRORS, metric="rel_l2",
                           sparsity="tile_sparsity", fmt="markdown"):
    """Table: tile sparsity (FLOP sparsity; setting) each method reaches per error budget.

    Methods are sorted by what they reach at the loosest budget; "—" means no swept setting
    of the method met the budget.
    """
    blocks = []
    for workload, methods in sorted(matched_error(records, errors, metric, sparsity).items()):
        title = (f"{workload}: highest {sparsity.replace('_', ' ')} with {metric} <= budget "
                 "(FLOP sparsity; setting)")
        header = ["method"] + [f"{metric} <= {e:g}" for e in errors]
        rows = []
        for method in sorted(methods, key=lambda m: (-_best(methods[m], errors[-1], sparsity),
                                                     m)):
            cells = [method]
            for budget in errors:
                run = methods[method][budget]
                cells.append("—" if run is None else
                             f"{run[sparsity]:.1%} ({run['flop_sparsity']:.1%}; {_setting(run)})")
            rows.append(cells)
        blocks.append((title, header, rows))
    return _render(blocks, fmt)


def markdown_matched_sparsity(records, sparsities=DEFAULT_SPARSITIES, metric="rel_l2",
                              sparsity="tile_sparsity", fmt="markdown"):
    """Table: lowest error each method reaches at each sparsity level (setting)."""
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
                cells.append("—" if run is None else f"{run[metric]:.2%} ({_setting(run)})")
            rows.append(cells)
        blocks.append((title, header, rows))
    return _render(blocks, fmt)
