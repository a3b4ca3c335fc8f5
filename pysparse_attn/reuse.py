"""Plan reuse across denoising steps: a step's kept tiles become the next steps' plan.

In-loop skip rules still pay ``Q K^T`` for every tile they skip. Attention patterns of a video
DiT drift slowly across sampler steps, so :class:`PlanReuse` runs the rule over the full plan
(or a selector's plan) at a *refresh* step, keeps the tiles the rule kept, and at the
following steps visits only those tiles (optionally dilated by a margin of neighbouring
tiles), with the same rule still running inside them: the tiles dropped cost nothing. A cheap
*guard* estimates, from block scores, how much softmax mass has moved outside the reused plan
and refreshes the heads whose estimate grew past a budget, or whose in-loop kept share moved.

Everything that decides a refresh stays on the arrays' device (NumPy or CuPy): the host never
reads a decision, so a GPU call adds no host synchronisation of its own (see
:class:`PlanReuse`). ``docs/reuse.rst`` says what the guard does and does not guarantee.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import numpy as np

from . import backends
from ._api import _build, _check_finite_option, _plan_scores, attention
from ._arrays import canonicalize, check_block, check_scale, on_cuda
from ._plan import Plan, tile_count
from ._rules import Blasst, Cef, Recall
from ._select import TopK, TopP

__all__ = ["PlanReuse", "ReuseStats", "LayerState", "tile_neighbourhood", "dilate_tiles"]

_ORDERS = ("natural", "score", "peak")


# ---------------------------------------------------------------------------------------------
# Dilation: neighbouring key tiles, in the token grid or in tile index


def tile_neighbourhood(n_keys: int, block_k: int, margin: int, grid=None) -> np.ndarray:
    """Which key tiles lie within ``margin`` neighbour steps of each key tile.

    Without a grid, tile ``J'`` neighbours ``J`` when ``|J - J'| <= margin``. With the token
    grid ``(T, H, W)`` (tokens frame-major, ``n = (t * H + y) * W + x``, as Wan and
    HunyuanVideo flatten them), two tiles are one step apart when a token of one and a token of
    the other are adjacent in the grid (Chebyshev distance 1 in ``(t, y, x)``: the tiles before
    and after in the row, above and below, and in the neighbouring frames); ``margin`` steps
    compose that relation.

    Parameters
    ----------
    n_keys : int
        Key sequence length ``Nk``.
    block_k : int
        Key tile size ``Bk``.
    margin : int
        Neighbour steps, ``>= 0`` (0: each tile only itself).
    grid : (int, int, int), optional
        Token grid of the keys; its product must be ``n_keys``.

    Returns
    -------
    reach : bool array ``(nk, nk)``
        ``reach[J, J']`` is true when ``J'`` is within ``margin`` steps of ``J`` (symmetric,
        true on the diagonal).

    Examples
    --------
    >>> from pysparse_attn.reuse import tile_neighbourhood
    >>> tile_neighbourhood(8, 2, 1).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 1, 0],
           [0, 1, 1, 1],
           [0, 0, 1, 1]])
    """
    n_keys, block_k = _positive("n_keys", n_keys), _positive("block_k", block_k)
    margin = _non_negative("margin", margin)
    nk = tile_count(n_keys, block_k)
    index = np.arange(nk)
    if grid is None:
        return np.abs(index[:, None] - index[None, :]) <= margin
    grid = _check_grid(grid, n_keys)
    step = np.eye(nk, dtype=bool)
    T, H, W = grid
    t, y, x = np.unravel_index(np.arange(n_keys), grid)
    tile = np.arange(n_keys) // block_k
    for dt in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                valid = ((0 <= t + dt) & (t + dt < T) & (0 <= y + dy) & (y + dy < H)
                         & (0 <= x + dx) & (x + dx < W))
                other = ((t + dt) * H + (y + dy)) * W + (x + dx)
                step[tile[valid], tile[other[valid]]] = True
    reach = np.eye(nk, dtype=bool)
    for _ in range(margin):
        reach = (reach.astype(np.int32) @ step.astype(np.int32)) > 0
    return reach


def dilate_tiles(kept, reach):
    """Tiles within reach of a kept tile: ``dilated[..., J'] = any_J kept[..., J] & reach[J, J']``.

    Parameters
    ----------
    kept : bool array ``(B, H, nq, nk)``
        NumPy or CuPy.
    reach : bool array ``(nk, nk)``
        From :func:`tile_neighbourhood`, in ``kept``'s namespace.

    Returns
    -------
    dilated : bool array ``(B, H, nq, nk)``, a superset of ``kept``.
    """
    xp = _namespace(kept)
    nk = kept.shape[-1]
    if tuple(reach.shape) != (nk, nk):
        raise ValueError(f"reach must be ({nk}, {nk}) for {nk} key tiles, got {reach.shape}")
    # A float32 product counts reachable kept tiles exactly (counts <= nk < 2^24) and runs as
    # one matrix product on either device.
    counts = kept.reshape(-1, nk).astype(xp.float32) @ reach.astype(xp.float32)
    return (counts > 0).reshape(kept.shape)


# ---------------------------------------------------------------------------------------------
# Per-call statistics and per-layer state


@dataclass(frozen=True)
class ReuseStats:
    """What one :meth:`PlanReuse.attention` call did.

    Array fields live on the inputs' device (in the namespace of the inputs); the float
    properties read them, which on a GPU synchronises (read them after the step, not inside
    the model's forward).

    Attributes
    ----------
    layer : hashable
        The caller's layer key.
    step : int
        The sampler step.
    dense : bool
        A dense step (one of the first ``dense_steps``): exact attention, no plan, no rule.
    refreshed : bool array ``(B, H)``
        Heads whose plan was refreshed at this call (the rule ran over the full plan, or the
        selector's); the others attended with their reused plan. All true on a dense step.
    plan_tiles, kept_tiles : int array ``(B, H)``
        Tiles the plan visited (``Q K^T`` computed) and tiles whose ``P V`` was accumulated.
    tiles : int
        Tiles of one head, ``nq * nk``.
    recall_bound : array ``(B, H, Nq)``
        The kernel's certificate, per row: a lower bound on the share of the *visited* mass
        (the plan's tiles) that the kept tiles hold. It says nothing about the tiles the reused
        plan dropped; on refreshed heads with no selector the plan is every tile, so there it
        bounds the full-row recall.
    outside_mass : float array ``(B, H)`` or None
        The guard's estimate, from block scores, of the softmax mass outside the plan the
        heads would reuse, this step: the mean over query tiles of the pooled estimate
        ``softmax_J(S_IJ)`` summed over the tiles outside (``docs/design.rst`` section 3).
        None on dense steps and on the first plan step.
    outside_growth : float array ``(B, H)`` or None
        ``outside_mass`` minus the same estimate at the head's refresh step: what the guard
        compares with ``mass_budget``. The estimator's bias (pooled scores are flatter than the
        true tile mass) largely cancels in the difference.
    kept_share : float array ``(B, H)`` or None
        ``kept_tiles / plan_tiles``: the in-loop rule's kept share inside the plan (None on
        dense steps).
    attention : AttentionStats
        The stats of the underlying :func:`pysparse_attn.attention` call (``.plan`` is the
        plan used).
    """

    layer: Hashable
    step: int
    dense: bool
    refreshed: Any
    plan_tiles: Any
    kept_tiles: Any
    tiles: int
    recall_bound: Any
    outside_mass: Optional[Any]
    outside_growth: Optional[Any]
    kept_share: Optional[Any]
    attention: Any = field(repr=False)

    @property
    def plan_density(self) -> float:
        """Share of all tiles the plan visited."""
        return float(self.plan_tiles.sum()) / (self.tiles * math.prod(self.plan_tiles.shape))

    @property
    def kept_density(self) -> float:
        """Share of all tiles whose ``P V`` was accumulated."""
        return float(self.kept_tiles.sum()) / (self.tiles * math.prod(self.kept_tiles.shape))

    @property
    def refreshed_heads(self) -> int:
        """How many (batch, head) pairs were refreshed."""
        return int(self.refreshed.sum())

    @property
    def reused(self) -> bool:
        """True when no head was refreshed (and the step was not dense)."""
        return not self.dense and self.refreshed_heads == 0


@dataclass
class LayerState:
    """The reuse state of one layer (per batch entry and head), on the inputs' device.

    Attributes
    ----------
    shape : (B, H, Nq, Nk)
    kept : bool array ``(B, H, nq, nk)``
        The tiles the rule kept at each head's last refresh.
    plan : bool array ``(B, H, nq, nk)``
        ``kept`` dilated by the margin: what the next steps visit.
    refresh_step : int array ``(B, H)``
        Each head's last refresh step.
    outside_at_refresh : float array ``(B, H)``
        The guard's outside-mass estimate of ``plan`` at the refresh step.
    kept_share_baseline : float array ``(B, H)``
        The kept share at the first reused call after the refresh (NaN until then).
    pending : bool array ``(B, H)``
        The kept-share guard fired at the last call: refresh at the next one.
    last_step : int
        The step of the layer's last call.
    scheduled_refresh_step : int or None
        With ``rule_in_plan=False`` (refreshes known on the host), the step of the last
        refresh; else None.
    reused_plan : Plan or None
        With ``rule_in_plan=False``, the :class:`Plan` of ``plan`` once a step between
        refreshes has built it: the next such steps attend with it as it is (a plan is plain
        data, never written), so they do no bitmap work at all.
    """

    shape: tuple
    kept: Any
    plan: Any
    refresh_step: Any
    outside_at_refresh: Any
    kept_share_baseline: Any
    pending: Any
    last_step: int
    scheduled_refresh_step: Optional[int] = None
    reused_plan: Optional[Plan] = None


# ---------------------------------------------------------------------------------------------
# PlanReuse


class PlanReuse:
    """Reuse each layer's kept tiles across sampler steps, with a drift guard.

    One object per sampler run; the caller keys the state by layer (any hashable, e.g.
    ``("cond", 7)`` for block 7 of the conditional pass of classifier-free guidance) and says
    which step each call belongs to. Per layer and per (batch, head):

    1. steps ``0 .. dense_steps - 1`` are dense (exact attention, no plan, no rule);
    2. at a *refresh* the rule runs over the full plan (or ``select``'s plan) and the tiles it
       keeps, dilated by ``margin`` neighbouring tiles (in the token grid when ``grid`` is
       given, else in tile index), become the head's plan; the first non-dense call refreshes
       every head;
    3. otherwise the head attends with its stored plan, the same rule running inside it. With
       ``order="natural"`` the plan is exactly ``Plan.from_kept(plan_bitmap)``; with ``"peak"``
       or ``"score"`` it visits the same tiles in the order the plan builder gives them from
       this step's block scores (what lets the rule skip within the plan);
    4. a head refreshes when ``refresh_every`` steps have passed since its last refresh, when
       the guard's estimate of the mass outside its plan has grown by more than
       ``mass_budget`` since that refresh (checked on this step's q and k, before attending),
       or when at the previous call its in-loop kept share inside the plan moved by more than
       ``kept_tolerance`` from the share of the first reused call (known only after a call,
       so it acts one call late).

    Refreshed and reused heads share one kernel call: the plan of each (batch, head) is chosen
    on the device (``where(refresh, full, reused)``), so no decision is read by the host. On a
    GPU the only host synchronisations are those of the calls underneath (``check_finite=True``
    reads one flag per input; the default None checks on the host only) and the float
    properties of :class:`ReuseStats`, which read device data when (and only if) asked.

    Parameters
    ----------
    skip : Blasst, Cef, Recall or None
        The in-loop rule, at refresh and reused steps alike.
    select : None, TopK or TopP
        The plan a refresh runs the rule over; None: every tile. ``BlockMask`` is not accepted
        (a fixed mask needs no reuse).
    refresh_every : int or None
        Refresh a head when this many steps have passed since its last refresh (1: every step,
        i.e. no reuse); None: only when the guard fires.
    dense_steps : int
        Leading dense steps, ``>= 0``.
    margin : int
        Neighbour steps by which a refresh's kept set is dilated (:func:`tile_neighbourhood`).
    grid : (int, int, int), optional
        Token grid ``(T, H, W)`` of the keys, for dilation in the grid.
    mass_budget : float or None
        Allowed growth of the estimated outside mass (per head, mean over query tiles) before a
        refresh; None disables this guard.
    kept_tolerance : float or None
        Allowed move of the kept share inside a reused plan; None disables this guard.
    order : {"natural", "score", "peak"} or None
        Visit order; None: ``"peak"`` with a skip rule, else ``"natural"`` (as
        :func:`pysparse_attn.attention`).
    rule_in_plan : bool
        Run the rule inside reused plans too (the default). False runs the steps between
        refreshes without it, visiting every plan tile at the plain kernel's speed (where the
        rule's bookkeeping costs more than its skips save inside a plan of kept tiles, as on
        the GPU); every refresh must then be known on the host, so ``mass_budget`` and
        ``kept_tolerance`` must be None (refreshes follow ``refresh_every`` alone).
    peak : int
        Leading tiles of ``order="peak"``.
    block : (int, int)
        Tile sizes ``(Bq, Bk)``.

    Examples
    --------
    >>> import pysparse_attn as psa
    >>> from pysparse_attn.workloads import denoising_trajectory
    >>> trajectory = denoising_trajectory((3, 8, 8), steps=6, heads=2, head_dim=32)
    >>> reuse = psa.PlanReuse(psa.Recall(0.95), refresh_every=3, dense_steps=1,
    ...                       block=(16, 16), grid=trajectory.grid, margin=1)
    >>> for step, (q, k, v) in enumerate(trajectory):
    ...     out, stats = reuse.attention(q, k, v, layer=0, step=step)
    >>> stats.dense, bool(stats.recall_bound.min() >= 0.95)
    (False, True)
    """

    def __init__(self, skip=None, *, select=None, refresh_every: Optional[int] = 5,
                 dense_steps: int = 2, margin: int = 0, grid=None,
                 mass_budget: Optional[float] = 0.02, kept_tolerance: Optional[float] = 0.1,
                 order: Optional[str] = None, peak: int = 4, block=(64, 64),
                 rule_in_plan: bool = True):
        if skip is not None and not isinstance(skip, (Blasst, Cef, Recall)):
            raise TypeError(f"skip must be None, Blasst, Cef or Recall, got "
                            f"{type(skip).__name__}")
        if select is not None and not isinstance(select, (TopK, TopP)):
            raise TypeError(f"select must be None, TopK or TopP, got {type(select).__name__}")
        if skip is None and select is None:
            raise ValueError("PlanReuse needs a skip rule or a selector: without either a "
                             "refresh keeps every tile and reuse is dense attention")
        self.skip = skip
        self.select = select
        self.refresh_every = None if refresh_every is None else _positive("refresh_every",
                                                                          refresh_every)
        self.dense_steps = _non_negative("dense_steps", dense_steps)
        self.margin = _non_negative("margin", margin)
        self.grid = None if grid is None else _check_grid(grid)
        self.mass_budget = _optional_fraction("mass_budget", mass_budget)
        self.kept_tolerance = _optional_fraction("kept_tolerance", kept_tolerance)
        if order is None:
            order = "peak" if skip is not None else "natural"
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS} or None, got {order!r}")
        self.order = order
        if isinstance(peak, bool) or not isinstance(peak, (int, np.integer)) or peak < 0:
            raise ValueError(f"peak must be a non-negative int, got {peak!r}")
        self.peak = int(peak)
        self.block = check_block(block)
        if not isinstance(rule_in_plan, (bool, np.bool_)):
            raise TypeError(f"rule_in_plan must be a bool, got {type(rule_in_plan).__name__}")
        self.rule_in_plan = bool(rule_in_plan)
        if not self.rule_in_plan and (self.mass_budget is not None
                                      or self.kept_tolerance is not None):
            raise ValueError("rule_in_plan=False needs mass_budget=None and kept_tolerance=None: "
                             "a guard decides on the device, so the host could not tell which "
                             "calls need the rule")
        self._layers: dict = {}
        self._reach: dict = {}

    def __repr__(self):
        return (f"PlanReuse(skip={self.skip!r}, select={self.select!r}, "
                f"refresh_every={self.refresh_every}, dense_steps={self.dense_steps}, "
                f"margin={self.margin}, grid={self.grid}, mass_budget={self.mass_budget}, "
                f"kept_tolerance={self.kept_tolerance}, order={self.order!r}, "
                f"block={self.block}, rule_in_plan={self.rule_in_plan}, "
                f"layers={len(self._layers)})")

    # -- state ---------------------------------------------------------------------------

    @property
    def layers(self) -> tuple:
        """Keys of the layers with stored state."""
        return tuple(self._layers)

    def state(self, layer) -> LayerState:
        """The stored :class:`LayerState` of ``layer`` (KeyError when it has none yet)."""
        try:
            return self._layers[layer]
        except KeyError:
            raise KeyError(f"layer {layer!r} has no reuse state (no plan step yet)") from None

    def reset(self, layer=None) -> None:
        """Forget one layer's state (the next call refreshes it), or every layer's."""
        if layer is None:
            self._layers.clear()
        else:
            self._layers.pop(layer, None)

    def fork(self) -> "PlanReuse":
        """A copy with the same settings and layer states, whose calls leave this one untouched.

        Cheap at any size: stored arrays are never written in place (each call stores new
        ones), so the copy shares them instead of duplicating device memory. Use it to try a
        step several ways from one state (the benchmark times each call from a fork).
        """
        twin = copy.copy(self)
        twin._layers = dict(self._layers)
        return twin

    def _reach_matrix(self, xp, n_keys):
        key = (xp.__name__, n_keys)
        if key not in self._reach:
            if self.grid is not None and int(np.prod(self.grid)) != n_keys:
                raise ValueError(f"grid {self.grid} has {int(np.prod(self.grid))} tokens but "
                                 f"k has {n_keys}")
            self._reach[key] = xp.asarray(tile_neighbourhood(n_keys, self.block[1],
                                                             self.margin, self.grid))
        return self._reach[key]

    # -- one call --------------------------------------------------------------------------

    def attention(self, q, k, v, *, layer, step: int, scale=None, layout: str = "bhnd",
                  backend: str = "auto", threads=None, check_finite=None, precision=None):
        """Attention of ``layer`` at sampler ``step``, reusing or refreshing its plan.

        Parameters
        ----------
        q, k, v : arrays
            As in :func:`pysparse_attn.attention`.
        layer : hashable
            The caller's key for this attention layer (and branch: each call of a step needs
            its own key).
        step : int
            Sampler step, ``>= 0``, increasing from one call of a layer to the next.
        scale, layout, backend, threads, check_finite, precision
            As in :func:`pysparse_attn.attention` (``check_finite=None``: checked on the host,
            not on a GPU, where the check would read device data).

        Returns
        -------
        out : array
            Same shape, layout, dtype and namespace as ``q``.
        stats : ReuseStats
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        try:
            hash(layer)
        except TypeError:
            raise TypeError(f"layer must be hashable, got {type(layer).__name__}") from None
        state = self._layers.get(layer)
        if state is not None and step <= state.last_step:
            raise ValueError(f"step {step} of layer {layer!r} does not follow its last call at "
                             f"step {state.last_step}; give each call of one step its own "
                             "layer key (e.g. (branch, layer) with classifier-free guidance)")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        name = backends.resolve(backend, on_cuda(q))
        on_gpu = backends.is_gpu(name)
        arrays = canonicalize({"q": q, "k": k, "v": v}, layout=layout,
                              device="gpu" if on_gpu else "host",
                              check_finite=_check_finite_option(check_finite, on_gpu))
        scale = check_scale(scale, arrays.q.shape[-1])
        options = dict(scale=scale, block=self.block, backend=name, threads=threads,
                       check_finite=False, precision=precision)
        B, H, Nq, _ = arrays.q.shape
        shape = (B, H, Nq, arrays.k.shape[2])
        if state is not None and state.shape != shape:
            raise ValueError(f"layer {layer!r} was planned for (B, H, Nq, Nk) = {state.shape}, "
                             f"got {shape}; call reset({layer!r}) first")
        if step < self.dense_steps:
            return self._dense(arrays, layer, step, shape, options)
        return self._planned(arrays, layer, step, shape, state, options)

    def _dense(self, arrays, layer, step, shape, options):
        xp = arrays.xp
        out, st = attention(arrays.q, arrays.k, arrays.v, return_stats=True, **options)
        B, H = shape[:2]
        tiles = tile_count(shape[2], self.block[0]) * tile_count(shape[3], self.block[1])
        all_tiles = xp.full((B, H), tiles, dtype=xp.int64)
        stats = ReuseStats(layer, step, True, arrays.to_caller(xp.ones((B, H), dtype=bool)),
                           arrays.to_caller(all_tiles), arrays.to_caller(all_tiles), tiles,
                           st.recall_bound, None, None, None, st)
        return arrays.from_canonical(out), stats

    def _outside_mass(self, xp, estimate, plan_bitmap):
        """Mean over query tiles of the estimated mass outside ``plan_bitmap``, ``(B, H)``."""
        return xp.where(plan_bitmap, 0.0, estimate).sum(axis=-1).mean(axis=-1)

    def _planned(self, arrays, layer, step, shape, state, options):
        xp = arrays.xp
        q, k, v = arrays.q, arrays.k, arrays.v
        B, H, Nq, Nk = shape
        nq, nk = tile_count(Nq, self.block[0]), tile_count(Nk, self.block[1])
        # The plan builder's own scores, straight on the canonical arrays: the public
        # block_scores would check q and k for NaN again (a device read on a GPU).
        scores = _plan_scores(arrays, self.block, options["scale"])
        estimate = _softmax(xp, scores)
        if not self.rule_in_plan and state is not None and (
                self.refresh_every is None
                or step - state.scheduled_refresh_step < self.refresh_every):
            return self._plain(arrays, layer, step, state, estimate, options, nq * nk)
        if self.select is None:
            refresh_bitmap = xp.ones((B, H, nq, nk), dtype=bool)
        else:
            refresh_bitmap = _build(arrays, self.select, "natural", self.peak, self.block,
                                    options["scale"]).visit_bitmap()

        if state is None:
            refresh = xp.ones((B, H), dtype=bool)
            outside = growth = None
        else:
            outside = self._outside_mass(xp, estimate, state.plan)
            growth = outside - state.outside_at_refresh
            refresh = state.pending.copy()
            if self.refresh_every is not None:
                refresh |= (step - state.refresh_step) >= self.refresh_every
            if self.mass_budget is not None:
                refresh |= growth > self.mass_budget
        reused_bitmap = refresh_bitmap if state is None else state.plan
        bitmap = xp.where(refresh[:, :, None, None], refresh_bitmap, reused_bitmap)

        # Without the rule in the plan every refresh is scheduled (steps between them take
        # _plain): this call is one.
        scheduled = None if self.rule_in_plan else step
        if self.order == "natural":
            plan = Plan.from_kept(bitmap, block=self.block, order="natural", shape=shape)
        else:  # the tiles of bitmap in the builder's order, from the scores at hand
            plan = _build(arrays, None, self.order, self.peak, self.block, options["scale"],
                          mask=bitmap, scores=scores)
        out, st = attention(q, k, v, plan=plan, skip=self.skip, return_stats=True, **options)

        kept = st.kept
        plan_tiles = bitmap.sum(axis=(2, 3))
        kept_tiles = kept.sum(axis=(2, 3))
        share = kept_tiles / plan_tiles
        new_plan = xp.where(refresh[:, :, None, None],
                            dilate_tiles(kept, self._reach_matrix(xp, Nk)) if self.margin
                            else kept, bitmap)
        if state is None:
            baseline = xp.full((B, H), xp.nan)
            pending = xp.zeros((B, H), dtype=bool)
            refresh_step = xp.full((B, H), step, dtype=xp.int64)
            kept_store = kept
            outside_store = self._outside_mass(xp, estimate, new_plan)
        else:
            first_reuse = ~refresh & xp.isnan(state.kept_share_baseline)
            baseline = xp.where(refresh, xp.nan,
                                xp.where(first_reuse, share, state.kept_share_baseline))
            if self.kept_tolerance is not None:
                pending = ~refresh & (xp.abs(share - baseline) > self.kept_tolerance)
            else:
                pending = xp.zeros((B, H), dtype=bool)
            refresh_step = xp.where(refresh, step, state.refresh_step)
            kept_store = xp.where(refresh[:, :, None, None], kept, state.kept)
            outside_store = xp.where(refresh, self._outside_mass(xp, estimate, new_plan),
                                     state.outside_at_refresh)
        self._layers[layer] = LayerState(shape, kept_store, new_plan, refresh_step,
                                         outside_store, baseline, pending, step, scheduled)
        give = arrays.to_caller
        stats = ReuseStats(layer, step, False, give(refresh), give(plan_tiles), give(kept_tiles),
                           nq * nk, st.recall_bound,
                           None if outside is None else give(outside),
                           None if growth is None else give(growth), give(share), st)
        return arrays.from_canonical(out), stats

    def _plain(self, arrays, layer, step, state, estimate, options, tiles):
        """A step between scheduled refreshes without the rule: every head attends with its
        stored plan bitmap, visiting all of it (``kept`` is the plan), so the state carries
        over unchanged but for ``last_step`` and the plan built once for these steps."""
        xp = arrays.xp
        plan = state.reused_plan
        if plan is None:
            plan = Plan.from_kept(state.plan, block=self.block, order="natural",
                                  shape=state.shape)
        out, st = attention(arrays.q, arrays.k, arrays.v, plan=plan, skip=None,
                            return_stats=True, **options)
        self._layers[layer] = dataclasses.replace(state, last_step=step, reused_plan=plan)
        outside = self._outside_mass(xp, estimate, state.plan)
        plan_tiles = state.plan.sum(axis=(2, 3))
        B, H = state.shape[:2]
        give = arrays.to_caller
        stats = ReuseStats(layer, step, False, give(xp.zeros((B, H), dtype=bool)),
                           give(plan_tiles), give(plan_tiles), tiles, st.recall_bound,
                           give(outside), give(outside - state.outside_at_refresh),
                           give(xp.ones((B, H), dtype=xp.float64)), st)
        return arrays.from_canonical(out), stats


# ---------------------------------------------------------------------------------------------
# Helpers

def _softmax(xp, scores):
    shifted = scores - scores.max(axis=-1, keepdims=True)
    weights = xp.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def _namespace(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy

    if isinstance(x, cupy.ndarray):
        return cupy
    raise TypeError(f"expected a NumPy or CuPy array, got {type(x).__name__}")


def _positive(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _non_negative(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _optional_fraction(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _check_grid(grid, n_keys=None) -> tuple:
    if not isinstance(grid, (tuple, list)) or len(grid) != 3 or any(
            isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in grid):
        raise ValueError(f"grid must be a (T, H, W) tuple of positive ints, got {grid!r}")
    grid = tuple(int(g) for g in grid)
    if n_keys is not None and int(np.prod(grid)) != n_keys:
        raise ValueError(f"grid {grid} has {int(np.prod(grid))} tokens but there are "
                         f"{n_keys} keys")
    return grid
