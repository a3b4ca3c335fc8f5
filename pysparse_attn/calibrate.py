"""Calibration: skip thresholds for a target tile sparsity, or for one budget of the whole layer.

Two questions, one module.

**A target sparsity, one shared threshold** (``target_sparsity=``, the original behaviour).
``calibrate_blasst`` needs one dense pass. A BLASST skip requires the tile's max to lie below
the running max (``ln lam <= 0``), so keeping the tile would not have moved the running max
either: the running max of every row, and hence every later decision, is the same as in the
dense pass, whatever ``lam``. The statistic ``g_J = max_i (max_{j in J} s_ij - m_i)`` of each
visited tile, computed once, decides the tile for every threshold: it is skipped iff
``g_J < ln lam``. The sparsity curve is therefore exact, and so is its inversion.
``calibrate_cef`` and ``calibrate_recall`` cannot do that: a CEF or Recall skip changes the
running sum ``l`` (CEF may even skip a tile that would have raised the max), so later decisions
depend on earlier ones. They replay the library's own forward pass on a grid of thresholds and
refine each target by bisection.

**One budget for the layer, per-head parameters** (``max_error=`` or ``min_recall=``). The
budget is either the relative L2 error of the layer's output against dense attention,
``||O - O_dense||_F / ||O_dense||_F`` over all heads, or the mean over the layer's rows of the
true recall (the kept share of each softmax row). The method:

1. *One dense float64 pass* gives the dense output, each tile's softmax mass per query tile
   (so the recall of any kept set is a masked sum) and, for BLASST, the decision statistic
   ``g`` and each head's error at every threshold of the grid exactly (prefix sums of the
   per-tile P.V numerators in the order ``g`` removes tiles).
2. *Per-head curves.* For CEF and Recall each head is replayed alone on a grid of parameters
   through the chosen backend (a replay of one head costs ``1/H`` of a layer pass); each
   replay yields the head's skipped tiles, its squared output error and its missed mass.
3. *Allocation.* Both budgets are sums over heads: the layer's squared error is the sum of
   the heads' squared errors, its missed mass the sum of theirs, and its skipped tiles the sum
   of theirs. Choosing one grid point per head to skip the most tiles within the budget is a
   multiple-choice knapsack. It is solved greedily on each head's upper concave hull of
   (cost, skipped tiles): repeatedly take the hull step, over all heads, that buys the most
   skipped tiles per unit of cost while the total still fits (water-filling: at the end every
   head's marginal rate is about equal), then spend what is left on any single further point
   that fits. For CEF and Recall each head is finally bisected toward its next grid point
   with what is still left (``refine`` single-head replays each, heads with the best next
   rate first); BLASST's grid is already fine (quantiles of its exact statistics).

Why this is sound: (a) heads are independent in every backend (a row reads only its own head's
q and its kv head, and a per-head rule gives head ``h`` only its own parameter), so the
per-head rule's output on the calibration tensors *is* the concatenation of the single-head
replays; (b) the budgets are exactly additive over heads, so the layer's error and recall of
the chosen allocation are computed, not modelled, from the measured curves, and the budget
holds on the calibration tensors by construction; (c) greedy selection on concave hulls is the
optimum of the Lagrangian relaxation: no other allocation of hull points with no larger total
cost skips more tiles, except within the one hull step where the budget binds. What is not
guaranteed: transfer to other inputs (calibrate on representative tensors and keep a margin),
and resolution finer than the grid. One shared threshold (``per_head=False``) is the same
search with all heads tied to one grid point, refined by bisection; it is the baseline
``bench/calibrate_per_head.py`` compares against.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._arrays import canonicalize, check_block, check_scale
from ._plan import ORDERS, build_plan
from ._rules import Blasst, Cef, Recall, SkipRule, real_number

__all__ = ["BlasstCalibration", "CefCalibration", "RecallCalibration", "BudgetCalibration",
           "calibrate_blasst", "calibrate_cef", "calibrate_recall", "blasst_statistics"]


def _targets(target_sparsity):
    targets = np.atleast_1d(np.asarray(target_sparsity, dtype=np.float64))
    if targets.ndim != 1 or targets.size == 0:
        raise ValueError("target_sparsity must be a number or a 1-D sequence of numbers, got "
                         f"shape {targets.shape}")
    if not np.all(np.isfinite(targets)) or np.any(targets < 0) or np.any(targets >= 1):
        raise ValueError(f"target_sparsity values must lie in [0, 1), got {targets.tolist()}")
    return targets


def _order(order, peak):
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if isinstance(peak, bool) or not isinstance(peak, int) or peak < 0:
        raise ValueError(f"peak must be a non-negative int, got {peak!r}")
    return order


def _count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class _Budget:
    """One layer budget: ``kind`` is ``"error"`` or ``"recall"``, ``limit`` the user's value."""

    kind: str
    limit: float


def _mode(target_sparsity, max_error, min_recall, per_head, v):
    """Which question is asked: ``(targets, None, False)`` or ``(None, budget, per_head)``."""
    given = [name for name, value in (("target_sparsity", target_sparsity),
                                      ("max_error", max_error), ("min_recall", min_recall))
             if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of target_sparsity, max_error or min_recall, got "
                         + (", ".join(given) if given else "none"))
    if per_head is not None and not isinstance(per_head, bool):
        raise TypeError(f"per_head must be a bool or None, got {type(per_head).__name__}")
    if target_sparsity is not None:
        if per_head:
            raise ValueError("per_head applies to a layer budget (max_error or min_recall); "
                             "target_sparsity calibrates one shared threshold")
        return _targets(target_sparsity), None, False
    if max_error is not None:
        limit = real_number("max_error", max_error)
        if not 0.0 < limit < 1.0:
            raise ValueError(f"max_error must be in (0, 1), got {limit}")
        if v is None:
            raise ValueError("v is needed for max_error (the error is that of the output)")
        budget = _Budget("error", limit)
    else:
        limit = real_number("min_recall", min_recall)
        if not 0.0 < limit <= 1.0:
            raise ValueError(f"min_recall must be in (0, 1], got {limit}")
        budget = _Budget("recall", limit)
    return None, budget, True if per_head is None else per_head


def _canonical(q, k, v, layout):
    arrays = canonicalize({"q": q, "k": k, "v": k if v is None else v}, layout=layout,
                          device="host")
    return arrays.q, arrays.k, (None if v is None else arrays.v)


def _visit_order(plan, b, h, query_tile):
    """The key tiles of a dense plan's query tile in visit order."""
    if hasattr(plan, "row_indices"):  # CSR plan (front end v2)
        offsets = np.asarray(plan.row_offsets[b, h])
        return np.asarray(plan.row_indices[b, h, offsets[query_tile]:offsets[query_tile + 1]])
    return np.asarray(plan.visit[b, h, query_tile])  # dense plan: all nk tiles, no padding


# ---------------------------------------------------------------------------------------------
# The dense float64 pass


@dataclass
class _DensePass:
    """What one dense float64 pass over the calibration tensors yields.

    ``stat``: BLASST statistic ``(B, H, nq, nk)`` (``+inf`` where never decided); ``mass``:
    per query tile, the sum over its rows of each key tile's softmax share ``(B, H, nq, nk)``;
    ``out``: dense output ``(B, H, Nq, D)`` (None without v); ``blasst_sq_error``: per head and
    log-threshold of the grid, the squared error of BLASST's output (None unless asked).
    """

    stat: np.ndarray
    mass: np.ndarray
    out: Any
    blasst_sq_error: Any


def _dense_pass(q, k, v, plan, scale, block, *, want_mass, log_grid=None,
                query_tiles_per_chunk=8):
    B, H, Nq, _ = q.shape
    group = H // k.shape[1]
    bq, bk = block
    nq, nk = plan.nq, plan.nk
    Nk = k.shape[2]
    starts = np.arange(nk) * bk
    stat = np.full((B, H, nq, nk), np.inf)
    mass = np.zeros((B, H, nq, nk)) if want_mass else None
    out = None if v is None else np.empty(q.shape[:3] + (v.shape[-1],))
    sq_error = None if log_grid is None else np.zeros((H, log_grid.size))
    for b in range(B):
        for h in range(H):
            keys = np.asarray(k[b, h // group], dtype=np.float64)
            values = None if v is None else np.asarray(v[b, h // group], dtype=np.float64)
            if log_grid is not None:  # per-tile P.V numerators need whole tiles of values
                padded = np.zeros((nk * bk, values.shape[1]))
                padded[:Nk] = values
                value_tiles = padded.reshape(nk, bk, -1)
            for first in range(0, nq, query_tiles_per_chunk):
                last = min(first + query_tiles_per_chunk, nq)
                rows = np.asarray(q[b, h, first * bq:min(last * bq, Nq)], dtype=np.float64)
                logits = scale * (rows @ keys.T)
                tile_max = np.maximum.reduceat(logits, starts, axis=1)  # (rows, nk)
                if want_mass or v is not None:
                    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
                    row_sum = weights.sum(axis=1)
                    tile_weight = np.add.reduceat(weights, starts, axis=1)
                for qt in range(first, last):
                    r0, r1 = (qt - first) * bq, min((qt - first + 1) * bq, Nq - first * bq)
                    visit = _visit_order(plan, b, h, qt)
                    in_order = tile_max[r0:r1][:, visit]
                    running = np.maximum.accumulate(in_order, axis=1)
                    stat[b, h, qt, visit[1:]] = (in_order[:, 1:] - running[:, :-1]).max(axis=0)
                    if want_mass:
                        mass[b, h, qt] = (tile_weight[r0:r1] / row_sum[r0:r1, None]).sum(axis=0)
                    if v is None:
                        continue
                    w = weights[r0:r1]
                    if log_grid is None:
                        out[b, h, first * bq + r0:first * bq + r1] = \
                            (w @ values) / row_sum[r0:r1, None]
                        continue
                    padded_w = np.zeros((r1 - r0, nk * bk))
                    padded_w[:, :Nk] = w
                    numerators = np.matmul(padded_w.reshape(r1 - r0, nk, bk).transpose(1, 0, 2),
                                           value_tiles)  # (nk, rows, D)
                    total = numerators.sum(axis=0)
                    dense = total / row_sum[r0:r1, None]
                    out[b, h, first * bq + r0:first * bq + r1] = dense
                    _blasst_errors(stat[b, h, qt], numerators, tile_weight[r0:r1], total,
                                   row_sum[r0:r1], dense, log_grid, sq_error[h])
    return _DensePass(stat=stat, mass=mass, out=out, blasst_sq_error=sq_error)


def _blasst_errors(stat_row, numerators, tile_weight, total, row_sum, dense, log_grid, into):
    """Add to ``into[g]`` the squared error of one query tile under ``Blasst(exp(log_grid[g]))``.

    ``Blasst`` removes the tiles with ``stat < ln lam``; sorting by ``stat`` makes each
    threshold's removed set a prefix, so its output is ``(total - prefix numerators) /
    (row_sum - prefix weights)``: exact attention over the kept tiles, which is what any
    backend computes for that kept set.
    """
    by_stat = np.argsort(stat_row, kind="stable")
    removed = np.searchsorted(stat_row[by_stat], log_grid, side="left")  # (G,)
    if not removed.any():
        return
    prefix_num = np.cumsum(numerators[by_stat], axis=0)
    prefix_w = np.cumsum(tile_weight[:, by_stat], axis=1)
    for count in np.unique(removed[removed > 0]):
        kept_out = (total - prefix_num[count - 1]) / (row_sum - prefix_w[:, count - 1])[:, None]
        into[removed == count] += float(((kept_out - dense) ** 2).sum())


def blasst_statistics(q, k, *, order="peak", peak=4, block=(64, 64), scale=None,
                      layout="bhnd", query_tiles_per_chunk=8):
    """Per visited tile, the BLASST decision statistic of the dense pass.

    ``g[b, h, I, J] = max_i (max_{j in J} s_ij - m_i)`` over the valid rows ``i`` of query tile
    ``I``, where ``m_i`` is the running max before ``J`` in the visit order. The tile is skipped
    by ``Blasst(lam)`` iff ``g < ln(lam)``. Entries that are never decided (the first visited
    tile of each query tile) are ``+inf``.

    Parameters
    ----------
    q, k : arrays
        As in :func:`pysparse_attn.attention` (host arrays).
    order, peak, block, scale, layout
        As in :func:`pysparse_attn.attention` (dense plan, ``select=None``).
    query_tiles_per_chunk : int
        Query tiles whose logits are held at once (memory ``chunk * Bq * Nk`` float64).

    Returns
    -------
    g : float64 array ``(B, H, nq, nk)``
    """
    order = _order(order, peak)
    block = check_block(block)
    q, k, _ = _canonical(q, k, None, layout)
    scale = check_scale(scale, q.shape[-1])
    plan = build_plan(np, q, k, None, order, peak, block, scale)
    return _dense_pass(q, k, None, plan, scale, block, want_mass=False,
                       query_tiles_per_chunk=query_tiles_per_chunk).stat


# ---------------------------------------------------------------------------------------------
# Budgets: per-head curves and their allocation


@dataclass
class BudgetCalibration:
    """Result of a calibration to one layer budget (``max_error=`` or ``min_recall=``).

    Attributes
    ----------
    rule : Blasst, Cef or Recall
        The calibrated rule: per-head parameters ``(H,)`` (``per_head=True``) or one shared.
    params : float64 array ``(H,)``
        The rule's parameter per query head, in the rule's own units (``lam`` of Blasst and
        Cef, ``target`` of Recall).
    budget : str
        ``"error"`` (relative L2 error of the layer output) or ``"recall"`` (mean row recall).
    limit : float
        The budget: the largest allowed error, or the smallest allowed mean recall.
    met : bool
        Whether the budget holds on the calibration tensors (False only when even the
        mildest grid point exceeds it; a warning says so).
    error, recall, sparsity : float
        The layer's relative L2 error vs dense, mean row recall and tile sparsity under
        ``rule`` on the calibration tensors (measured; the error only with ``v``).
    head_error, head_recall, head_sparsity : float64 arrays ``(H,)``
        The same per query head.
    grid : float64 array ``(G,)``
        Parameters replayed (or, for BLASST, evaluated exactly), in the order the sparsity
        grows.
    curve_sparsity, curve_error, curve_recall : float64 arrays ``(H, G)``
        Per head and grid point: tile sparsity, relative error (NaN without ``v``) and mean
        recall; NaN where a sweep stopped early because that head alone exceeded the budget.
    """

    rule: SkipRule
    params: np.ndarray
    budget: str
    limit: float
    met: bool
    error: float
    recall: float
    sparsity: float
    head_error: np.ndarray
    head_recall: np.ndarray
    head_sparsity: np.ndarray
    grid: np.ndarray = field(repr=False)
    curve_sparsity: np.ndarray = field(repr=False)
    curve_error: np.ndarray = field(repr=False)
    curve_recall: np.ndarray = field(repr=False)

    def rules(self):
        """``[rule]``, for symmetry with the target-sparsity results."""
        return [self.rule]

    def head_rules(self):
        """One rule per query head with that head's parameter as a scalar.

        Running head ``h`` alone with ``head_rules()[h]`` gives exactly what ``rule`` gives
        head ``h`` (heads are independent), e.g. on a backend without per-head parameters.
        """
        return [dataclasses.replace(self.rule, **{
            item.name: float(getattr(self.rule, item.name)[h])
            for item in dataclasses.fields(self.rule)
            if isinstance(getattr(self.rule, item.name), np.ndarray)})
            for h in range(self.params.size)]


@dataclass
class _Curves:
    """Per head and grid point: skipped tiles, squared error, missed mass (NaN: not measured)."""

    skipped: np.ndarray
    sq_error: np.ndarray
    missed: np.ndarray
    tiles_per_head: int
    rows_per_head: int
    dense_sq: np.ndarray  # (H,) squared norm of each head's dense output


def _costs(curves: _Curves, budget: _Budget):
    """Per-head cost of each grid point and the layer's allowance, in additive units."""
    if budget.kind == "error":
        return curves.sq_error, budget.limit ** 2 * float(curves.dense_sq.sum())
    return curves.missed, (1.0 - budget.limit) * curves.rows_per_head * curves.skipped.shape[0]


def _hull(cost, gain):
    """Indices of the upper concave hull of ``(cost, gain)`` from the cheapest point up.

    Only points that skip more than every cheaper point, and that lie on the concave envelope,
    remain: each step then buys fewer tiles per unit cost than the one before.
    """
    valid = np.flatnonzero(np.isfinite(cost))
    ranked = valid[np.lexsort((-gain[valid], cost[valid]))]
    frontier = []
    for index in ranked:
        if frontier and gain[index] <= gain[frontier[-1]]:
            continue
        while len(frontier) >= 2:
            a, b = frontier[-2], frontier[-1]
            # b lies on or below the chord from a to index: not on the concave envelope.
            if (gain[b] - gain[a]) * (cost[index] - cost[a]) <= \
                    (gain[index] - gain[a]) * (cost[b] - cost[a]):
                frontier.pop()
            else:
                break
        frontier.append(index)
    return frontier


def _allocate(cost, gain, allowance):
    """One grid index per head maximising ``sum gain`` with ``sum cost <= allowance``.

    Greedy on the concave hulls (the Lagrangian optimum), then a fill pass that moves single
    heads to any further point the leftover allows. Returns ``(choice, feasible)``.
    """
    heads = cost.shape[0]
    hulls = [_hull(cost[h], gain[h]) for h in range(heads)]
    if any(not hull for hull in hulls):
        raise ValueError("a head has no measured grid point")
    position = [0] * heads
    choice = np.array([hull[0] for hull in hulls])
    spent = float(cost[np.arange(heads), choice].sum())
    if spent > allowance:
        return choice, False
    steps = []

    def push(h):
        hull, at = hulls[h], position[h]
        if at + 1 < len(hull):
            a, b = hull[at], hull[at + 1]
            d_cost, d_gain = cost[h, b] - cost[h, a], gain[h, b] - gain[h, a]
            rate = d_gain / d_cost if d_cost > 0 else math.inf
            heapq.heappush(steps, (-rate, h, d_cost))

    for h in range(heads):
        push(h)
    while steps:
        _, h, d_cost = heapq.heappop(steps)
        if spent + d_cost > allowance:
            continue  # this head is blocked: its later steps cost at least as much per tile
        spent += d_cost
        position[h] += 1
        choice[h] = hulls[h][position[h]]
        push(h)
    improved = True
    while improved:  # fill: the best single move any head can still afford
        improved = False
        best = None
        for h in range(heads):
            affordable = np.isfinite(cost[h]) & (cost[h] - cost[h, choice[h]] <= allowance - spent)
            candidates = np.flatnonzero(affordable & (gain[h] > gain[h, choice[h]]))
            if candidates.size:
                pick = candidates[np.argmax(gain[h, candidates])]
                if best is None or gain[h, pick] - gain[h, choice[h]] > best[0]:
                    best = (gain[h, pick] - gain[h, choice[h]], h, pick)
        if best is not None:
            _, h, pick = best
            spent += cost[h, pick] - cost[h, choice[h]]
            choice[h] = pick
            improved = True
    return choice, True


def _shared_choice(cost, gain, allowance):
    """The one grid index, shared by all heads, that skips most within the allowance."""
    total_cost = cost.sum(axis=0)
    total_gain = gain.sum(axis=0)
    feasible = np.flatnonzero(np.isfinite(total_cost) & (total_cost <= allowance))
    if feasible.size == 0:
        return int(np.nanargmin(np.where(np.isfinite(total_cost), total_cost, np.inf))), False
    return int(feasible[np.argmax(total_gain[feasible])]), True


@dataclass
class _Family:
    """How to build one rule family from a parameter and what its parameter means."""

    name: str
    make: Any  # parameter (float or (H,) array) -> SkipRule


def _at(curves, choice):
    """``(skipped, squared error, missed)`` per head at grid indices ``choice``."""
    rows = np.arange(choice.size)
    return (curves.skipped[rows, choice], curves.sq_error[rows, choice],
            curves.missed[rows, choice])


def _summary(family, params, measured, curves, grid, budget, met, per_head):
    """Assemble a :class:`BudgetCalibration`; ``measured`` = per-head (skipped, sq, missed)."""
    heads = curves.skipped.shape[0]
    skipped, sq_error, missed = (np.asarray(x, dtype=np.float64) for x in measured)
    with np.errstate(invalid="ignore", divide="ignore"):
        head_error = np.sqrt(sq_error / curves.dense_sq)
        curve_error = np.sqrt(curves.sq_error / curves.dense_sq[:, None])
    params = np.asarray(params, dtype=np.float64)
    rule = family.make(params if per_head else float(params[0]))
    return BudgetCalibration(
        rule=rule, params=params, budget=budget.kind, limit=budget.limit, met=bool(met),
        error=float(math.sqrt(sq_error.sum() / curves.dense_sq.sum())),
        recall=float(1.0 - missed.sum() / (curves.rows_per_head * heads)),
        sparsity=float(skipped.sum() / (curves.tiles_per_head * heads)),
        head_error=head_error, head_recall=1.0 - missed / curves.rows_per_head,
        head_sparsity=skipped / curves.tiles_per_head, grid=np.asarray(grid),
        curve_sparsity=curves.skipped / curves.tiles_per_head, curve_error=curve_error,
        curve_recall=1.0 - curves.missed / curves.rows_per_head)


def _warn_unmet(family, budget):
    what = "error" if budget.kind == "error" else "mean recall"
    warnings.warn(f"{family}: even the mildest threshold of the grid misses the {what} budget "
                  f"{budget.limit:g} on these tensors; returning it (met=False)", UserWarning,
                  stacklevel=3)


class _Replayer:
    """Single-head replays of the library's forward pass, scored against the dense pass."""

    def __init__(self, q, k, v, dense, options):
        self.q, self.k, self.v = q, k, (k if v is None else v)
        self.has_values = v is not None
        self.dense = dense
        self.options = options
        self.group = q.shape[1] // k.shape[1]

    def head(self, h, rule):
        """``(skipped tiles, squared error, missed mass)`` of ``rule`` on head ``h`` alone."""
        from ._api import attention

        kv = h // self.group
        out, stats = attention(self.q[:, h:h + 1], self.k[:, kv:kv + 1], self.v[:, kv:kv + 1],
                               skip=rule, return_stats=True, layout="bhnd", **self.options)
        kept = np.asarray(stats.kept)[:, 0]
        sq = math.nan
        if self.has_values:
            sq = float(((np.asarray(out, dtype=np.float64) - self.dense.out[:, h]) ** 2).sum())
        return (int((~kept).sum()), sq, float((self.dense.mass[:, h] * ~kept).sum()))

    def layer(self, rule):
        """Per-head ``(skipped, sq error, missed)`` arrays of one rule on every head."""
        parts = [self.head(h, rule) for h in range(self.q.shape[1])]
        return tuple(np.array(column, dtype=np.float64) for column in zip(*parts))


def _replay_budget(family, q, k, v, budget, per_head, grid, refine, options):
    """Budgeted calibration of a replayed rule (CEF, Recall): curves, allocation, result."""
    B, H, Nq, _ = q.shape
    block, scale = options["block"], options["scale"]
    plan = build_plan(np, q, k, None, options["order"], options["peak"], block, scale)
    dense = _dense_pass(q, k, v, plan, scale, block, want_mass=True)
    replay = _Replayer(q, k, v, dense, options)
    G = grid.size
    curves = _Curves(skipped=np.full((H, G), np.nan), sq_error=np.full((H, G), np.nan),
                     missed=np.full((H, G), np.nan), tiles_per_head=B * plan.nq * plan.nk,
                     rows_per_head=B * Nq,
                     dense_sq=(dense.out ** 2).sum(axis=(0, 2, 3)) if v is not None
                     else np.ones(H))
    for h in range(H):
        for index, param in enumerate(grid):
            skipped, sq, missed = replay.head(h, family.make(float(param)))
            curves.skipped[h, index], curves.sq_error[h, index] = skipped, sq
            curves.missed[h, index] = missed
            cost, allowance = _costs(curves, budget)
            # Past the layer's whole allowance no allocation can use this head's point, and
            # further along the grid the head only skips more: stop its sweep here.
            if cost[h, index] > allowance:
                break
    cost, allowance = _costs(curves, budget)
    gain = np.where(np.isfinite(cost), curves.skipped, -np.inf)
    budget_cost = 1 if budget.kind == "error" else 2  # index in (skipped, sq error, missed)
    if per_head:
        choice, met = _allocate(cost, gain, allowance)
        if not met:
            _warn_unmet(family.name, budget)
            return _summary(family, grid[choice], _at(curves, choice), curves, grid, budget,
                            met, True)
        params = grid[choice].astype(np.float64)
        measured = [list(column) for column in _at(curves, choice)]
        spent = float(np.sum(measured[budget_cost]))
        # Between grid points: bisect each head toward its next point with what is left,
        # heads with the most tiles per unit cost on their next step first.
        def next_rate(h):
            following = choice[h] + 1
            if following >= G or not np.isfinite(cost[h, following]):
                return -math.inf
            d_cost = cost[h, following] - cost[h, choice[h]]
            d_gain = gain[h, following] - gain[h, choice[h]]
            return d_gain / d_cost if d_cost > 0 else math.inf
        for h in sorted(range(H), key=next_rate, reverse=True):
            if choice[h] + 1 >= G:
                continue
            low, high = float(grid[choice[h]]), float(grid[choice[h] + 1])
            for _ in range(refine):
                middle = 0.5 * (low + high)
                trial = replay.head(h, family.make(middle))
                change = trial[budget_cost] - measured[budget_cost][h]
                if spent + change <= allowance and trial[0] >= measured[0][h]:
                    spent += change
                    params[h], low = middle, middle
                    for column, value in zip(measured, trial):
                        column[h] = value
                else:
                    high = middle
        return _summary(family, params, measured, curves, grid, budget, True, True)
    index, met = _shared_choice(cost, gain, allowance)
    shared = np.full(H, index)
    if not met:
        _warn_unmet(family.name, budget)
        return _summary(family, grid[shared], _at(curves, shared), curves, grid, budget, met,
                        False)
    # Bisection between the best feasible grid point and the next one, on the whole layer.
    low = float(grid[index])
    high = float(grid[index + 1]) if index + 1 < G else None
    param, measured = low, _at(curves, shared)
    for _ in range(refine if high is not None else 0):
        middle = 0.5 * (low + high)
        trial = replay.layer(family.make(middle))
        if float(np.sum(trial[budget_cost])) <= allowance:
            low, param, measured = middle, middle, trial
        else:
            high = middle
    return _summary(family, np.full(H, param), measured, curves, grid, budget, True, False)


# ---------------------------------------------------------------------------------------------
# BLASST


@dataclass
class BlasstCalibration:
    """Result of :func:`calibrate_blasst` with ``target_sparsity``.

    Attributes
    ----------
    targets : float64 array
        Requested tile sparsities.
    lam : float64 array
        Per target, the BLASST threshold that reaches it on the calibration tensors (the
        midpoint, in log space, of the interval of thresholds that give that sparsity).
    achieved : float64 array
        Tile sparsity each ``lam`` gives on the calibration tensors (exact; can exceed the
        target by at most one tile's share).
    a, b : float
        Fit of ``lam * n_keys = a * exp(b * sparsity)`` (the BLASST paper's model) by least
        squares in log space over the observed curve; use :meth:`predict` to transfer a
        target to another sequence length.
    n_keys : int
        Key count ``Nk`` of the calibration tensors.
    max_sparsity : float
        Highest tile sparsity any ``lam <= 1`` reaches here; targets above it are clipped to
        ``lam = 1`` with a warning.
    curve_sparsity, curve_lam : float64 arrays
        The exact sparsity-versus-threshold curve (subsampled), for plotting.
    """

    targets: np.ndarray
    lam: np.ndarray
    achieved: np.ndarray
    a: float
    b: float
    n_keys: int
    max_sparsity: float
    curve_sparsity: np.ndarray = field(repr=False)
    curve_lam: np.ndarray = field(repr=False)

    def rules(self):
        """One :class:`~pysparse_attn.Blasst` per target."""
        return [Blasst(float(lam)) for lam in self.lam]

    def predict(self, sparsity, n_keys=None):
        """``lam`` the fitted model gives for ``sparsity`` at ``n_keys`` keys (default: same)."""
        n_keys = self.n_keys if n_keys is None else int(n_keys)
        lam = self.a * np.exp(self.b * np.asarray(sparsity, dtype=np.float64)) / n_keys
        return np.minimum(lam, 1.0)


def calibrate_blasst(q, k, target_sparsity=None, *, v=None, max_error=None, min_recall=None,
                     per_head=None, order="peak", peak=4, block=(64, 64), scale=None,
                     layout="bhnd", curve_points=200, grid_points=256):
    """BLASST thresholds: for target tile sparsities, or per head for one layer budget.

    Everything comes from dense float64 passes and is exact on the calibration tensors (see
    the module docstring): BLASST decisions do not depend on earlier skips. A budget takes two
    passes: the decision statistics, then each head's error at every threshold of the grid
    they define.

    Parameters
    ----------
    q, k : arrays ``(B, H, N, D)``
        Calibration tensors (host arrays), e.g. from :func:`pysparse_attn.workloads.load_qkv`.
    target_sparsity : float or sequence of float, optional
        Tile sparsities in ``[0, 1)``: one shared threshold per target
        (returns :class:`BlasstCalibration`).
    v : array, optional
        Values; needed for ``max_error``.
    max_error : float, optional
        Largest relative L2 error of the layer's output vs dense, in ``(0, 1)``.
    min_recall : float, optional
        Smallest mean row recall of the layer, in ``(0, 1]``.
    per_head : bool, optional
        With a budget: one threshold per query head (default) or one shared threshold.
    order, peak, block, scale, layout
        As the later :func:`pysparse_attn.attention` calls will use them (the visit order
        changes which tiles a threshold skips).
    curve_points : int
        Points of the stored curve and of the exponential fit (``target_sparsity``).
    grid_points : int
        With a budget: thresholds evaluated, at quantiles of the decision statistics of all
        heads (so consecutive thresholds skip about equally many more tiles).

    Returns
    -------
    BlasstCalibration or BudgetCalibration

    Warns
    -----
    UserWarning
        When a target exceeds the largest sparsity any ``lam <= 1`` reaches on these tensors
        (its ``lam`` is clipped to 1), or when no threshold meets the budget.

    Examples
    --------
    >>> import pysparse_attn as psa
    >>> from pysparse_attn.calibrate import calibrate_blasst
    >>> from pysparse_attn.workloads import video_qkv
    >>> q, k, v = video_qkv((4, 8, 12), heads=2, head_dim=32, kinds="local", sharpness=2.0)
    >>> cal = calibrate_blasst(q, k, 0.3, block=(32, 32))
    >>> _, stats = psa.attention(q, k, v, skip=cal.rules()[0], block=(32, 32),
    ...                          return_stats=True)
    >>> bool(abs(stats.sparsity - cal.achieved[0]) < 0.02)
    True
    >>> per_head = calibrate_blasst(q, k, v=v, max_error=0.01, block=(32, 32))
    >>> per_head.rule.lam.shape, bool(per_head.error <= 0.01)
    ((2,), True)
    """
    targets, budget, per_head = _mode(target_sparsity, max_error, min_recall, per_head, v)
    if budget is not None:
        return _blasst_budget(q, k, v, budget, per_head, order=order, peak=peak, block=block,
                              scale=scale, layout=layout,
                              grid_points=_count("grid_points", grid_points, 2))
    stat = blasst_statistics(q, k, order=order, peak=peak, block=block, scale=scale,
                             layout=layout)
    total = stat.size
    n_keys = int(k.shape[2] if layout == "bhnd" else k.shape[1])
    # Sorted decision statistics: lam just above the j-th smallest skips exactly j + 1 tiles.
    decided = np.sort(stat[np.isfinite(stat)])
    skippable = decided[decided < 0.0]
    max_sparsity = skippable.size / total
    lam = np.empty_like(targets)
    achieved = np.empty_like(targets)
    for index, target in enumerate(targets):
        needed = math.ceil(target * total - 1e-9)
        if needed > skippable.size:
            warnings.warn(f"target sparsity {target:.4f} is above the largest BLASST reaches on "
                          f"these tensors ({max_sparsity:.4f}); using lam = 1",
                          UserWarning, stacklevel=2)
            lam[index], achieved[index] = 1.0, max_sparsity
            continue
        if needed == 0:
            upper = skippable[0] if skippable.size else 0.0
            log_lam = upper - 1.0 if np.isfinite(upper) else 0.0
        else:
            lower = skippable[needed - 1]
            upper = skippable[needed] if needed < skippable.size else 0.0
            log_lam = 0.5 * (lower + upper)
        # exp underflows below -745; no statistic of finite logits is that far below the max.
        lam[index] = math.exp(min(max(log_lam, -700.0), 0.0))
        achieved[index] = np.count_nonzero(decided < math.log(lam[index])) / total

    picks = np.unique(np.linspace(0, max(skippable.size - 1, 0), curve_points).astype(int))
    if skippable.size:
        curve_lam = np.exp(skippable[picks])
        curve_sparsity = (picks + 1) / total
    else:
        curve_lam = curve_sparsity = np.empty(0)
    if curve_sparsity.size >= 2 and np.ptp(curve_sparsity) > 0:
        b, log_a = np.polyfit(curve_sparsity, np.log(curve_lam * n_keys), 1)
        a = math.exp(log_a)
    else:
        a, b = float("nan"), float("nan")
    return BlasstCalibration(targets=targets, lam=lam, achieved=achieved, a=float(a),
                             b=float(b), n_keys=n_keys, max_sparsity=float(max_sparsity),
                             curve_sparsity=curve_sparsity, curve_lam=curve_lam)


def _blasst_budget(q, k, v, budget, per_head, *, order, peak, block, scale, layout,
                   grid_points):
    order = _order(order, peak)
    block = check_block(block)
    q, k, v = _canonical(q, k, v, layout)
    scale = check_scale(scale, q.shape[-1])
    B, H, Nq, _ = q.shape
    plan = build_plan(np, q, k, None, order, peak, block, scale)
    stat = _dense_pass(q, k, None, plan, scale, block, want_mass=False).stat
    skippable = np.sort(stat[np.isfinite(stat) & (stat < 0.0)])
    # Thresholds at statistic quantiles (so consecutive points skip about equally many more
    # tiles), each halfway to the next larger distinct statistic so that it skips a definite
    # set; the first point skips nothing. The curves are evaluated at log(lam) as the rule
    # computes it from lam: exp then log can move a value by an ulp, enough to flip a tile
    # that sits next to the threshold.
    if skippable.size:
        distinct = np.unique(skippable)
        picks = skippable[np.unique(np.round(
            np.linspace(0, skippable.size - 1, grid_points - 1)).astype(int))]
        above = np.append(distinct, 0.0)[np.searchsorted(distinct, picks, side="right")]
        points = np.concatenate([[max(float(distinct[0]) - 1.0, -700.0)],
                                 0.5 * (picks + above)])
    else:
        points = np.array([-1.0])
    lam_grid = np.unique(np.exp(points))
    log_grid = Blasst(lam_grid).kernel_params(lam_grid.size)
    dense = _dense_pass(q, k, v, plan, scale, block, want_mass=True,
                        log_grid=log_grid if v is not None else None)
    skipped = np.empty((H, log_grid.size))
    missed = np.empty((H, log_grid.size))
    for index, log_lam in enumerate(log_grid):
        skip_set = dense.stat < log_lam
        skipped[:, index] = skip_set.sum(axis=(0, 2, 3))
        missed[:, index] = (dense.mass * skip_set).sum(axis=(0, 2, 3))
    curves = _Curves(skipped=skipped,
                     sq_error=dense.blasst_sq_error if v is not None
                     else np.full(skipped.shape, np.nan),
                     missed=missed, tiles_per_head=B * plan.nq * plan.nk, rows_per_head=B * Nq,
                     dense_sq=(dense.out ** 2).sum(axis=(0, 2, 3)) if v is not None
                     else np.ones(H))
    family = _Family("calibrate_blasst", lambda lam: Blasst(lam))
    cost, allowance = _costs(curves, budget)
    if per_head:
        choice, met = _allocate(cost, skipped, allowance)
    else:
        index, met = _shared_choice(cost, skipped, allowance)
        choice = np.full(H, index)
    if not met:
        _warn_unmet(family.name, budget)
    return _summary(family, lam_grid[choice], _at(curves, choice), curves, lam_grid, budget, met,
                    per_head)


# ---------------------------------------------------------------------------------------------
# CEF and Recall (replayed)


@dataclass
class CefCalibration:
    """Result of :func:`calibrate_cef` with ``target_sparsity``.

    Attributes
    ----------
    targets : float64 array
        Requested tile sparsities.
    lam : float64 array
        Per target, the CEF threshold (a natural log) found by replay.
    mass : float64 array
        The same thresholds as :meth:`pysparse_attn.Cef.from_mass` shares ``p``
        (``lam = ln p + ln(Bk / Nk)``).
    achieved : float64 array
        Tile sparsity each ``lam`` gave in its replay.
    observed_range : (float, float)
        Lowest and highest sparsity seen over the threshold grid; targets outside it are
        clipped to the grid's end with a warning.
    grid_lam, grid_sparsity : float64 arrays
        The replayed grid (ascending ``lam``), for plotting.
    """

    targets: np.ndarray
    lam: np.ndarray
    mass: np.ndarray
    achieved: np.ndarray
    observed_range: tuple
    grid_lam: np.ndarray = field(repr=False)
    grid_sparsity: np.ndarray = field(repr=False)

    def rules(self):
        """One :class:`~pysparse_attn.Cef` per target."""
        return [Cef(float(lam)) for lam in self.lam]


@dataclass
class RecallCalibration:
    """Result of :func:`calibrate_recall` with ``target_sparsity``.

    Attributes
    ----------
    targets : float64 array
        Requested tile sparsities.
    recall_target : float64 array
        Per target, the ``Recall`` target found by replay.
    achieved : float64 array
        Tile sparsity each one gave in its replay.
    observed_range : (float, float)
        Lowest and highest sparsity seen over the grid.
    grid_target, grid_sparsity : float64 arrays
        The replayed grid (descending target, so ascending sparsity), for plotting.
    exact : bool
        Whether the rules use exact tile sums.
    """

    targets: np.ndarray
    recall_target: np.ndarray
    achieved: np.ndarray
    observed_range: tuple
    grid_target: np.ndarray = field(repr=False)
    grid_sparsity: np.ndarray = field(repr=False)
    exact: bool = False

    def rules(self):
        """One :class:`~pysparse_attn.Recall` per target."""
        return [Recall(float(target), exact=self.exact) for target in self.recall_target]


def _replay_targets(family, targets, grid, refine, sparsity_at):
    """Replay ``grid`` (sparsity ascending along it) and bisect each target.

    Returns ``(params, achieved, grid_sparsity, (low, high))``.
    """
    grid_sparsity = np.array([sparsity_at(param) for param in grid])
    low, high = float(grid_sparsity.min()), float(grid_sparsity.max())
    params = np.empty_like(targets)
    achieved = np.empty_like(targets)
    for index, target in enumerate(targets):
        if target < low or target > high:
            edge = int(np.argmin(grid_sparsity)) if target < low else int(np.argmax(grid_sparsity))
            warnings.warn(f"target sparsity {target:.4f} is outside the range {family} reaches "
                          f"on these tensors over the grid ({low:.4f} .. {high:.4f}); using "
                          f"{grid[edge]:.6g}", UserWarning, stacklevel=3)
            params[index], achieved[index] = grid[edge], grid_sparsity[edge]
            continue
        # Sparsity grows along the grid up to replay effects; bracket the first crossing.
        above = np.nonzero(grid_sparsity >= target)[0][0]
        if above == 0:
            params[index], achieved[index] = grid[0], grid_sparsity[0]
            continue
        lo, hi = grid[above - 1], grid[above]
        best_param, best = hi, grid_sparsity[above]
        for _ in range(refine):
            middle = 0.5 * (lo + hi)
            reached = sparsity_at(middle)
            if reached >= target:
                hi, best_param, best = middle, middle, reached
            else:
                lo = middle
        params[index], achieved[index] = best_param, best
    return params, achieved, grid_sparsity, (low, high)


def _check_grid(grid, default, check):
    grid = default if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.isfinite(grid)) or not check(grid):
        return None
    return grid


def _replay_options(order, peak, block, scale, layout, backend, refine):
    order = _order(order, peak)
    block = check_block(block)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be a non-negative int, got {refine!r}")
    return dict(order=order, peak=peak, block=block, scale=scale, backend=backend)


def _calibrate_replayed(family, label, q, k, v, layout, scale, targets, budget, per_head, grid,
                        refine, options):
    """The path every replayed rule (CEF, Recall) shares.

    With a budget: the :class:`BudgetCalibration` of :func:`_replay_budget`. Otherwise the
    ``_replay_targets`` tuple for ``targets``, each grid point measured by one call of the
    public :func:`~pysparse_attn.attention` with ``family.make(parameter)``.
    """
    if budget is not None:
        q, k, v = _canonical(q, k, v, layout)
        options["scale"] = check_scale(scale, q.shape[-1])
        return _replay_budget(family, q, k, v, budget, per_head, grid, refine, options)

    from ._api import attention

    def sparsity_at(parameter):
        _, stats = attention(q, k, k, skip=family.make(float(parameter)), layout=layout,
                             return_stats=True, **options)
        return stats.sparsity

    return _replay_targets(label, targets, grid, refine, sparsity_at)


def calibrate_cef(q, k, target_sparsity=None, *, v=None, max_error=None, min_recall=None,
                  per_head=None, order="peak", peak=4, block=(64, 64), scale=None,
                  layout="bhnd", backend="auto", grid=None, refine=8):
    """CEF thresholds: for target tile sparsities, or per head for one layer budget.

    Decisions depend on earlier skips, so the library's forward pass (``backend``) is
    replayed: for targets, on a grid then by ``refine`` bisection steps per target; for a
    budget, head by head over the grid, then allocated across heads (module docstring).

    Parameters
    ----------
    q, k : arrays ``(B, H, N, D)``
        Calibration tensors (host arrays).
    target_sparsity : float or sequence of float, optional
        Tile sparsities in ``[0, 1)``: one shared threshold per target (returns
        :class:`CefCalibration`; values are not needed, decisions never read them).
    v : array, optional
        Values; needed for ``max_error``.
    max_error : float, optional
        Largest relative L2 error of the layer's output vs dense, in ``(0, 1)``.
    min_recall : float, optional
        Smallest mean row recall of the layer, in ``(0, 1]``.
    per_head : bool, optional
        With a budget: one threshold per query head (default) or one shared threshold
        (refined by ``refine`` bisection steps on the whole layer).
    order, peak, block, scale, layout, backend
        As the later :func:`pysparse_attn.attention` calls will use them.
    grid : sequence of float, optional
        Thresholds ``lam <= 0`` to replay, ascending. Defaults: for targets 13 values from
        ``ln(Bk/Nk) - 12`` to 0; for a budget 41 values from ``ln(Bk/Nk) - 16`` to
        ``ln(Bk/Nk) + 4`` (or 0).
    refine : int
        Bisection steps per target (or for the shared threshold of a budget).

    Returns
    -------
    CefCalibration or BudgetCalibration

    Warns
    -----
    UserWarning
        When a target lies outside the sparsities observed on the grid, or no grid point
        meets the budget.
    """
    targets, budget, per_head = _mode(target_sparsity, max_error, min_recall, per_head, v)
    options = _replay_options(order, peak, block, scale, layout, backend, refine)
    block = options["block"]
    n_keys = int(k.shape[2] if layout == "bhnd" else k.shape[1])
    uniform = math.log(block[1] / n_keys)
    default = (np.linspace(uniform - 12.0, 0.0, 13) if budget is None
               else np.linspace(uniform - 16.0, min(uniform + 4.0, 0.0), 41))
    grid = _check_grid(None if grid is None else np.sort(np.asarray(grid, dtype=np.float64)),
                       default, lambda g: g[-1] <= 0)
    if grid is None:
        raise ValueError("grid must hold at least two finite thresholds <= 0")
    family = _Family("calibrate_cef", lambda lam: Cef(lam))
    result = _calibrate_replayed(family, "CEF", q, k, v, layout, scale, targets, budget,
                                 per_head, grid, refine, options)
    if budget is not None:
        return result
    lam, achieved, grid_sparsity, observed = result
    mass = np.exp(lam - uniform)
    return CefCalibration(targets=targets, lam=lam, mass=mass, achieved=achieved,
                          observed_range=observed, grid_lam=grid, grid_sparsity=grid_sparsity)


def calibrate_recall(q, k, target_sparsity=None, *, v=None, max_error=None, min_recall=None,
                     per_head=None, exact=False, order="peak", peak=4, block=(64, 64),
                     scale=None, layout="bhnd", backend="auto", grid=None, refine=8):
    """``Recall`` targets: for target tile sparsities, or per head for one layer budget.

    ``Recall(R)`` already certifies every row's recall ``>= R`` by itself; calibrating it
    pays off because its bound is conservative (true recall sits far above ``R``): on the
    calibration tensors a budget on the layer's error or *mean* recall is met with lower
    per-head targets, chosen head by head from replays (module docstring). A per-row floor
    needs no calibration: use ``Recall(floor)``.

    Parameters
    ----------
    q, k : arrays ``(B, H, N, D)``
        Calibration tensors (host arrays).
    target_sparsity : float or sequence of float, optional
        Tile sparsities in ``[0, 1)``: one shared target per sparsity (returns
        :class:`RecallCalibration`).
    v : array, optional
        Values; needed for ``max_error``.
    max_error : float, optional
        Largest relative L2 error of the layer's output vs dense, in ``(0, 1)``.
    min_recall : float, optional
        Smallest mean row recall of the layer, in ``(0, 1]``.
    per_head : bool, optional
        With a budget: one target per query head (default) or one shared target.
    exact : bool
        Calibrate ``Recall(..., exact=True)``.
    order, peak, block, scale, layout, backend
        As the later :func:`pysparse_attn.attention` calls will use them.
    grid : sequence of float, optional
        Recall targets in ``(0, 1]`` to replay. Default: 1 (never skips) and ``1 - 10**x``
        for 40 values of ``x`` from -6 to ``log10(0.95)`` (targets down to 0.05).
    refine : int
        Bisection steps per sparsity target (or for the shared target of a budget).

    Returns
    -------
    RecallCalibration or BudgetCalibration

    Examples
    --------
    >>> from pysparse_attn.calibrate import calibrate_recall
    >>> from pysparse_attn.workloads import video_qkv
    >>> q, k, v = video_qkv((4, 8, 12), heads=2, head_dim=32, kinds="local", sharpness=2.0)
    >>> cal = calibrate_recall(q, k, v=v, max_error=0.02, block=(32, 32), backend="reference")
    >>> cal.rule.target.shape, bool(cal.error <= 0.02)
    ((2,), True)
    """
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
    targets, budget, per_head = _mode(target_sparsity, max_error, min_recall, per_head, v)
    options = _replay_options(order, peak, block, scale, layout, backend, refine)
    default = np.concatenate([[1.0], 1.0 - np.logspace(-6.0, math.log10(0.95), 40)])
    # Descending targets: sparsity grows along the grid.
    grid = _check_grid(None if grid is None else -np.sort(-np.asarray(grid, dtype=np.float64)),
                       default, lambda g: bool(np.all((g > 0) & (g <= 1))))
    if grid is None:
        raise ValueError("grid must hold at least two finite recall targets in (0, 1]")
    family = _Family("calibrate_recall", lambda target: Recall(target, exact=exact))
    result = _calibrate_replayed(family, "Recall", q, k, v, layout, scale, targets, budget,
                                 per_head, grid, refine, options)
    if budget is not None:
        return result
    found, achieved, grid_sparsity, observed = result
    return RecallCalibration(targets=targets, recall_target=found, achieved=achieved,
                             observed_range=observed, grid_target=grid,
                             grid_sparsity=grid_sparsity, exact=exact)
