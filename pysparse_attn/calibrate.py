"""Calibration: the skip threshold that reaches a target tile sparsity on the user's tensors.

``calibrate_blasst`` needs one dense pass. A BLASST skip requires the tile's max to lie below
the running max (``ln lam <= 0``), so keeping the tile would not have moved the running max
either: the running max of every row, and hence every later decision, is the same as in the
dense pass, whatever ``lam``. The statistic ``g_J = max_i (max_{j in J} s_ij - m_i)`` of each
visited tile, computed once, decides the tile for every threshold: it is skipped iff
``g_J < ln lam``. The sparsity curve is therefore exact, and so is its inversion.

``calibrate_cef`` cannot do that: a CEF skip changes the running sum ``l`` (and may even skip
a tile that would have raised the max), so later decisions depend on earlier ones. It replays
the library's own forward pass on a grid of thresholds and refines each target by bisection.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from ._arrays import canonicalize, check_block, check_scale
from ._plan import ORDERS, build_plan
from ._rules import Blasst, Cef

__all__ = ["BlasstCalibration", "CefCalibration", "calibrate_blasst", "calibrate_cef",
           "blasst_statistics"]


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


@dataclass
class BlasstCalibration:
    """Result of :func:`calibrate_blasst`.

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
    arrays = canonicalize({"q": q, "k": k, "v": k}, layout=layout, device="host")
    scale = check_scale(scale, arrays.q.shape[-1])
    q, k = arrays.q, arrays.k
    plan = build_plan(np, q, k, None, order, peak, block, scale)
    B, H, Nq, _ = q.shape
    group = H // k.shape[1]
    bq, bk = block
    nq, nk = plan.nq, plan.nk
    starts = np.arange(nk) * bk
    stat = np.full((B, H, nq, nk), np.inf)
    visit = np.asarray(plan.visit)
    for b in range(B):
        for h in range(H):
            keys = np.asarray(k[b, h // group], dtype=np.float64)
            for first in range(0, nq, query_tiles_per_chunk):
                last = min(first + query_tiles_per_chunk, nq)
                rows = np.asarray(q[b, h, first * bq:min(last * bq, Nq)], dtype=np.float64)
                logits = scale * (rows @ keys.T)
                tile_max = np.maximum.reduceat(logits, starts, axis=1)  # (rows, nk)
                for qt in range(first, last):
                    r0, r1 = (qt - first) * bq, min((qt - first + 1) * bq, Nq - first * bq)
                    order_tiles = visit[b, h, qt]  # dense plan: all nk tiles, no padding
                    in_order = tile_max[r0:r1][:, order_tiles]
                    running = np.maximum.accumulate(in_order, axis=1)
                    g = (in_order[:, 1:] - running[:, :-1]).max(axis=0)
                    stat[b, h, qt, order_tiles[1:]] = g
    return stat


def calibrate_blasst(q, k, target_sparsity, *, order="peak", peak=4, block=(64, 64),
                     scale=None, layout="bhnd", curve_points=200):
    """BLASST thresholds reaching target tile sparsities, exact from one dense pass.

    Parameters
    ----------
    q, k : arrays ``(B, H, N, D)``
        Calibration tensors (host arrays), e.g. from :func:`pysparse_attn.workloads.load_qkv`.
        Every head shares one threshold, as in the kernels.
    target_sparsity : float or sequence of float
        Tile sparsities in ``[0, 1)``.
    order, peak, block, scale, layout
        As the later :func:`pysparse_attn.attention` calls will use them (the visit order
        changes which tiles a threshold skips).
    curve_points : int
        Points of the stored curve and of the exponential fit.

    Returns
    -------
    BlasstCalibration

    Warns
    -----
    UserWarning
        When a target exceeds the largest sparsity any ``lam <= 1`` reaches on these tensors
        (its ``lam`` is clipped to 1).

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
    """
    targets = _targets(target_sparsity)
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
            lower = -np.inf
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


@dataclass
class CefCalibration:
    """Result of :func:`calibrate_cef`.

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


def calibrate_cef(q, k, target_sparsity, *, order="peak", peak=4, block=(64, 64),
                  scale=None, layout="bhnd", backend="auto", grid=None, refine=8):
    """CEF thresholds reaching target tile sparsities, by replaying the forward pass.

    The library's forward pass (``backend``) runs on a grid of thresholds; each target is then
    bracketed on the grid and refined by ``refine`` bisection steps, each one more replay.

    Parameters
    ----------
    q, k : arrays ``(B, H, N, D)``
        Calibration tensors; values are not needed (decisions never read them).
    target_sparsity : float or sequence of float
        Tile sparsities in ``[0, 1)``.
    order, peak, block, scale, layout, backend
        As the later :func:`pysparse_attn.attention` calls will use them.
    grid : sequence of float, optional
        Thresholds ``lam <= 0`` to replay first; by default 13 values from
        ``ln(Bk/Nk) - 12`` to 0.
    refine : int
        Bisection steps per target.

    Returns
    -------
    CefCalibration

    Warns
    -----
    UserWarning
        When a target lies outside the sparsities observed on the grid.
    """
    from ._api import attention

    targets = _targets(target_sparsity)
    order = _order(order, peak)
    block = check_block(block)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be a non-negative int, got {refine!r}")
    n_keys = int(k.shape[2] if layout == "bhnd" else k.shape[1])
    uniform = math.log(block[1] / n_keys)
    if grid is None:
        grid = np.linspace(uniform - 12.0, 0.0, 13)
    grid = np.sort(np.asarray(grid, dtype=np.float64))
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.isfinite(grid)) or grid[-1] > 0:
        raise ValueError("grid must hold at least two finite thresholds <= 0")

    def sparsity_at(lam):
        _, stats = attention(q, k, k, skip=Cef(float(lam)), order=order, peak=peak,
                             block=block, scale=scale, layout=layout, backend=backend,
                             return_stats=True)
        return stats.sparsity

    grid_sparsity = np.array([sparsity_at(lam) for lam in grid])
    low, high = float(grid_sparsity.min()), float(grid_sparsity.max())
    lam = np.empty_like(targets)
    achieved = np.empty_like(targets)
    for index, target in enumerate(targets):
        if target < low or target > high:
            edge = int(np.argmin(grid_sparsity)) if target < low else int(np.argmax(grid_sparsity))
            warnings.warn(f"target sparsity {target:.4f} is outside the range CEF reaches on "
                          f"these tensors over the grid ({low:.4f} .. {high:.4f}); using "
                          f"lam = {grid[edge]:.3f}", UserWarning, stacklevel=2)
            lam[index], achieved[index] = grid[edge], grid_sparsity[edge]
            continue
        # Sparsity grows with lam up to replay effects; bracket the first crossing.
        above = np.nonzero(grid_sparsity >= target)[0][0]
        if above == 0:
            lam[index], achieved[index] = grid[0], grid_sparsity[0]
            continue
        lo, hi = grid[above - 1], grid[above]
        best_lam, best = hi, grid_sparsity[above]
        for _ in range(refine):
            middle = 0.5 * (lo + hi)
            reached = sparsity_at(middle)
            if reached >= target:
                hi, best_lam, best = middle, middle, reached
            else:
                lo = middle
        lam[index], achieved[index] = best_lam, best
    mass = np.exp(lam - uniform)
    return CefCalibration(targets=targets, lam=lam, mass=mass, achieved=achieved,
                          observed_range=(low, high), grid_lam=grid, grid_sparsity=grid_sparsity)
