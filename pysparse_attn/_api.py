"""Public entry points: validate, plan, dispatch to a backend, assemble results and stats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backends
from ._arrays import (LAYOUTS, Canonical, _check_finite, _check_rank_and_dtype,
                      as_backend_array, canonicalize, check_array, check_block, check_scale,
                      check_tile_mask, float_dtype_name, namespace_of, on_caller_stream, on_cuda)
from ._plan import ORDERS, Plan, build_plan, max_visits_of, tile_count
from .branches import linear as _linear
from .branches.feature_maps import FEATURE_MAPS
from ._plan import block_scores as _block_scores
from ._rules import check_rule
from ._select import BlockMask, SlaSplit, TopK, TopP
from ._stats import AttentionStats

__all__ = [
    "attention",
    "sla_attention",
    "attention_vjp",
    "sla_vjp",
    "block_scores",
    "recall",
    "plan",
]

LINEAR_MODES = _linear.MODES


@dataclass
class _Call:
    """One validated call: canonical arrays, the backend and the resolved options."""

    arrays: Canonical
    backend: Any
    backend_name: str
    scale: float
    block: tuple
    threads: Any
    out_dtype: Any = None  # what the caller gets back when precision converted the inputs

    def kwargs(self):
        return {"threads": self.threads} if self.backend_name == "cpu" else {}

    def result(self, out):
        """The output in the caller's dtype, layout and namespace."""
        if self.out_dtype is not None and out.dtype != self.out_dtype:
            out = out.astype(self.out_dtype)
        return self.arrays.from_canonical(out)


PRECISIONS = (None, "bf16")


def check_flag(name, value):
    """``value`` when it is a bool, else a TypeError naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_finite_option(check_finite, on_gpu):
    """``check_finite=None``: True on the host, False on GPU arrays (no synchronisation)."""
    if check_finite is None:
        return not on_gpu
    return check_flag("check_finite", check_finite)


def _apply_precision(arrays: Canonical, precision, backend_name):
    """Convert q, k, v for ``precision``; the dtype the caller gets back, or None.

    float32 on the GPU runs on bfloat16 tensor cores only when asked (``precision="bf16"``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None or 'bf16', got {precision!r}")
    if precision is None:
        if arrays.dtype_name == "float32" and backends.is_gpu(backend_name):
            raise ValueError(
                "precision: float32 inputs on the GPU are computed on bfloat16 tensor cores; "
                "pass precision='bf16' to accept bfloat16 rounding of q, k and v (the output "
                "stays float32), or give bfloat16/float16 inputs, or use backend='cpu' for "
                "float32 accuracy")
        return None
    if arrays.dtype_name == "bfloat16":
        return None
    import ml_dtypes

    caller_dtype = arrays.q.dtype
    arrays.input_dtype_name = arrays.dtype_name
    arrays.q, arrays.k, arrays.v = (x.astype(ml_dtypes.bfloat16) for x in
                                    (arrays.q, arrays.k, arrays.v))
    arrays.dtype_name = "bfloat16"
    return caller_dtype


def _prepare(q, k, v, *, scale, block, layout, backend, threads, check_finite=True,
             precision=None):
    block = check_block(block)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    name = backends.resolve(backend, on_cuda(q))
    module = backends.load(name)
    check_finite = _check_finite_option(check_finite, backends.is_gpu(name))
    arrays = canonicalize({"q": q, "k": k, "v": v}, layout=layout,
                          device="gpu" if backends.is_gpu(name) else "host",
                          check_finite=check_finite)
    out_dtype = _apply_precision(arrays, precision, name)
    supported = module.supported_blocks()
    if supported is not None and block not in [tuple(b) for b in supported]:
        raise ValueError(f"block {block} is not supported by backend {name!r}; "
                         f"supported: {sorted(tuple(b) for b in supported)}")
    head_dims = getattr(module, "supported_head_dims", lambda: None)()
    if head_dims is not None and arrays.q.shape[-1] not in head_dims:
        raise ValueError(f"q has head dim {arrays.q.shape[-1]}, which backend {name!r} does not "
                         f"support; supported: {sorted(head_dims)}")
    scale = check_scale(scale, arrays.q.shape[-1])
    return _Call(arrays, module, name, scale, block, threads, out_dtype)


def _forward(call: _Call, plan, skip, want_stats, out_dtype=None):
    """``(out, lse, kept, visited, bound)`` of the backend's fused forward over ``plan``."""
    a = call.arrays
    return call.backend.forward(a.q, a.k, a.v, plan, skip, call.scale, want_stats,
                                out_dtype=out_dtype, **call.kwargs())


def _kernel_out_dtype(call: _Call):
    """float32 when the caller gets float32 back from bfloat16 compute (no bf16 rounding of
    O), else None (the input dtype)."""
    if call.out_dtype is not None and np.dtype(call.out_dtype) == np.float32:
        return np.float32
    return None


def _given_plan(plan, call: _Call, select, order, block, extra_selector=False):
    """A user's plan checked against the call: used as given, never re-selected."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a pysparse_attn.Plan or None, got {type(plan).__name__}")
    if select is not None or extra_selector:
        raise ValueError("plan: give either a plan or a selector (select / critical, "
                         "negligible), not both")
    if order is not None and order != plan.order:
        raise ValueError(f"order={order!r} conflicts with the plan's order {plan.order!r}; "
                         "leave order=None with a plan")
    if block is not None and tuple(block) != plan.block:
        raise ValueError(f"block={tuple(block)} conflicts with the plan's block {plan.block}; "
                         "leave block=None with a plan")
    q, k = call.arrays.q, call.arrays.k
    expected = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if plan.shape != expected:
        raise ValueError(f"plan was built for shape {plan.shape} (B, H, Nq, Nk) but the inputs "
                         f"have {expected}")
    return plan.to("gpu" if call.arrays.on_gpu else "host")


def _block_or_plans(block, plan):
    """The tile sizes of a call: the given ones, the plan's, or (64, 64)."""
    if block is not None:
        return block
    if isinstance(plan, Plan):
        return plan.block
    return (64, 64)


def _check_order(order, skip, peak):
    if order is None:
        order = "peak" if skip is not None else "natural"
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} or None, got {order!r}")
    if order == "peak" and (isinstance(peak, bool) or not isinstance(peak, int) or peak < 0):
        raise ValueError(f"peak must be a non-negative int, got {peak!r}")
    return order


def _check_selector(select, arrays: Canonical, block):
    if select is None or isinstance(select, (TopK, TopP)):
        return select
    if isinstance(select, BlockMask):
        q, k = arrays.q, arrays.k
        shape = (q.shape[0], q.shape[1], tile_count(q.shape[2], block[0]),
                 tile_count(k.shape[2], block[1]))
        # Checked on the host only: on GPU arrays the check would read device data back, and
        # an empty row is well defined there (O = 0, LSE = -inf, like an empty plan row).
        return BlockMask(check_tile_mask("mask", select.mask, shape, arrays.on_gpu,
                                         nonempty=not arrays.on_gpu))
    raise TypeError(f"select must be None, BlockMask, TopK or TopP, got {type(select).__name__}")


def _build(arrays: Canonical, select, order, peak, block, scale, linear="marginal", *,
           mask=None, scores=None):
    """The one plan builder: the CuPy backend's accelerated selection on GPU arrays, the
    generic array-API one on the host (``mask`` and ``scores``: see
    :func:`pysparse_attn._plan.build_plan`; ``scores`` from :func:`_plan_scores`)."""
    if arrays.on_gpu:
        from .backends import cupy as gpu_backend

        return gpu_backend.build_plan(arrays.xp, arrays.q, arrays.k, select, order, peak, block,
                                      scale, linear, mask=mask, scores=scores)
    return build_plan(arrays.xp, arrays.q, arrays.k, select, order, peak, block, scale, linear,
                      mask=mask, scores=scores)


def _plan_scores(arrays: Canonical, block, scale):
    """The block scores :func:`_build` orders and selects by, on the arrays' device, with no
    input check (the public :func:`block_scores` checks, and computes in float64 on the
    host)."""
    if arrays.on_gpu:
        from .backends import cupy as gpu_backend

        return gpu_backend.plan_block_scores(arrays.q, arrays.k, block, scale)
    return _block_scores(arrays.xp, arrays.q, arrays.k, block, scale)


def _plan(call: _Call, select, order, peak, linear="marginal"):
    return _build(call.arrays, select, order, peak, call.block, call.scale, linear)


@on_caller_stream
def plan(q, k, *, select=None, order=None, peak=4, block=(64, 64), scale=None, layout="bhnd"):
    """Build the :class:`Plan` of a selector: which key tiles each query tile visits.

    The plan is what :func:`attention` builds internally; build it once and pass it as
    ``attention(..., plan=p)`` to reuse it across calls (the same q, k shapes and block). On
    GPU arrays it is built on the GPU with no device-to-host read.

    Parameters
    ----------
    q : array ``(B, Hq, Nq, D)``
        Queries (``(B, Nq, Hq, D)`` with ``layout="bnhd"``).
    k : array ``(B, Hkv, Nk, D)``
        Keys.
    select : None, BlockMask, TopK or TopP
        The selection method (docs/design.rst section 4); every tile when None.
    order : {"natural", "score", "peak"} or None
        Visit order of the kept tiles; None means ``"natural"`` (pass ``"peak"`` for a plan
        meant for a skip rule, which is what :func:`attention` picks with ``skip``).
    peak : int
        With ``order="peak"``: how many top-scoring tiles go first.
    block : (int, int)
        Tile sizes ``(Bq, Bk)``.
    scale : float, optional
        Logit scale of the block scores, ``D ** -0.5`` by default.
    layout : {"bhnd", "bnhd"}

    Returns
    -------
    Plan
        On the inputs' device.

    Examples
    --------
    >>> import numpy as np, pysparse_attn as psa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 100, 16)) for _ in range(3))
    >>> p = psa.plan(q, k, select=psa.TopK(k=2), block=(32, 32))
    >>> p.max_visits, p.counts.tolist()
    (2, [[[2, 2, 2, 2], [2, 2, 2, 2]]])
    >>> out = psa.attention(q, k, v, plan=p)
    """
    block = check_block(block)
    order = _check_order(order, None, peak)
    arrays = canonicalize({"q": q, "k": k, "v": k}, layout=layout, check_finite=False)
    scale = check_scale(scale, arrays.q.shape[-1])
    select = _check_selector(select, arrays, block)
    return _build(arrays, select, order, peak, block, scale)


def _stats(call: _Call, plan, lse, kept, visited, bound, marginal=None):
    """The stats of a call; nothing here reads device data (the summaries are lazy)."""
    give = call.arrays.to_caller
    return AttentionStats(
        lse=call.arrays.from_canonical(lse),
        kept=give(kept), visited=give(visited),
        recall_bound=call.arrays.from_canonical(bound),
        marginal=None if marginal is None else give(marginal),
        plan=plan, tiles=(kept, visited))


@on_caller_stream
def attention(q, k, v, *, select=None, skip=None, order=None, peak=4, scale=None,
              block=None, layout="bhnd", backend="auto", return_stats=False, threads=None,
              check_finite=None, plan=None, precision=None):
    """Block-sparse attention with an optional plan and in-loop skip rule.

    Computes ``softmax(scale * q k^T) v`` tile by tile with online softmax, visiting per query
    tile only the key tiles the selector keeps (all when ``select`` is None), in ``order``, and
    skipping in the loop the tiles the ``skip`` rule allows.

    Parameters
    ----------
    q : array ``(B, Hq, Nq, D)``
        Queries (``(B, Nq, Hq, D)`` with ``layout="bnhd"``). float64, float32, float16 or
        bfloat16; NumPy, CuPy or any DLPack producer (torch, JAX).
    k, v : array ``(B, Hkv, Nk, D)``
        Keys and values; ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention).
    select : None, BlockMask, TopK or TopP
        Plan-stage selector; tiles it drops cost nothing.
    skip : None, Blasst, Cef or Recall
        In-loop skip rule.
    order : {"natural", "score", "peak"} or None
        Visit order of the kept tiles; None means ``"peak"`` with a skip rule, else natural.
    peak : int
        With ``order="peak"``: how many top-scoring tiles go first.
    scale : float, optional
        Logit scale, ``D ** -0.5`` by default.
    block : (int, int), optional
        Query and key tile sizes ``(Bq, Bk)``; ``(64, 64)`` by default, the plan's with
        ``plan``.
    layout : {"bhnd", "bnhd"}
        Axis order of the inputs and outputs.
    backend : {"auto", "reference", "cpu", "cupy"}
        ``auto`` follows the inputs: GPU arrays to ``cupy``, host arrays to ``cpu`` (the
        reference when the compiled extension is missing or for float64... see the docs).
    return_stats : bool
        Also return an :class:`AttentionStats`.
    threads : int, optional
        CPU backend thread count (default: ``OMP_NUM_THREADS`` or all cores).
    check_finite : bool or None
        Reject NaN/inf inputs. None (the default) checks host inputs and not GPU ones: on the
        GPU a NaN or infinity propagates to the rows it reaches (their output and LSE become
        NaN), and ``True`` there costs one synchronisation with the host.
    plan : Plan, optional
        A plan from :func:`plan` or :meth:`Plan.from_kept` (or a previous call's
        ``stats.plan``), used as given: no selection runs. ``select`` must then be None and
        ``order``/``block`` None or equal to the plan's.
    precision : {None, "bf16"}
        None computes in the inputs' precision; float32 inputs on the GPU need ``"bf16"``
        (bfloat16 tensor cores, float32 accumulation and output), else a ValueError.
        ``"bf16"`` converts q, k, v to bfloat16 on any backend; the output keeps q's dtype.

    Returns
    -------
    out : array
        Same shape, layout, dtype and namespace as ``q``.
    stats : AttentionStats
        Only with ``return_stats=True``.

    Examples
    --------
    >>> import numpy as np, pysparse_attn as psa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 100, 16)) for _ in range(3))
    >>> out = psa.attention(q, k, v, block=(32, 32))
    >>> out.shape
    (1, 2, 100, 16)
    >>> sparse, stats = psa.attention(q, k, v, skip=psa.Recall(0.9), block=(32, 32),
    ...                               return_stats=True)
    >>> bool((stats.recall_bound >= 0.9).all())
    True
    """
    check_rule(skip)
    return_stats = check_flag("return_stats", return_stats)
    call = _prepare(q, k, v, scale=scale, block=_block_or_plans(block, plan), layout=layout,
                    backend=backend, threads=threads, check_finite=check_finite,
                    precision=precision)
    if plan is not None:
        plan = _given_plan(plan, call, select, order, block)
    else:
        order = _check_order(order, skip, peak)
        plan = _plan(call, _check_selector(select, call.arrays, call.block), order, peak)
    out, lse, kept, visited, bound = _forward(call, plan, skip, return_stats,
                                             _kernel_out_dtype(call))
    result = call.result(out)
    if not return_stats:
        return result
    return result, _stats(call, plan, lse, kept, visited, bound)


def _check_projection(call: _Call, proj_weight, proj_bias):
    """``(W, b)`` on the backend's device in the accumulation dtype (None where not given).

    Never rounded below it: float64 where the linear branch computes in float64 (the
    reference, and float64 inputs on ``cpu``), float32 otherwise (a float64 ``W`` with 16-bit
    or float32 inputs is used in float32 accumulation, never in the inputs' dtype). Host arrays
    are checked for NaN and infinity; GPU arrays are not (that would read a flag back to the
    host), so a non-finite ``W`` or ``b`` there gives a non-finite output.
    """
    D = call.arrays.q.shape[-1]
    xp = call.arrays.xp
    acc = _linear.accumulator(xp, call.arrays.q.dtype, exact=call.backend_name == "reference")
    checked = []
    expected = (("proj_weight", proj_weight, (D, D)), ("proj_bias", proj_bias, (D,)))
    for name, value, shape in expected:
        if value is None:
            checked.append(None)
            continue
        value = as_backend_array(name, value, call.arrays.on_gpu)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        if value.dtype.kind != "f" and str(value.dtype) != "bfloat16":
            raise TypeError(f"{name} must be a floating array, got dtype {value.dtype}")
        value = value.astype(acc, copy=False)  # read only: the caller's array is never written
        if not call.arrays.on_gpu and not bool(xp.all(xp.isfinite(value))):
            raise ValueError(f"{name} contains NaN or infinity")
        checked.append(value)
    return checked


def _check_sla_options(linear, feature_map, eps):
    if linear not in LINEAR_MODES:
        raise ValueError(f"linear must be one of {LINEAR_MODES}, got {linear!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if eps is None:
        return 1e-5 if linear == "global" else 0.0
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a real number or None, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _sla_forward(q, k, v, critical, negligible, linear, feature_map, proj_weight, proj_bias,
                 eps, block, skip, order, peak, scale, layout, backend, threads, check_finite,
                 plan=None, precision=None, planned=True):
    """Validate and plan one SLA call; the sparse kernel runs only when asked.

    Returns ``(call, plan, weight, bias, eps, sparse)``: ``sparse(want_stats)`` runs the sparse
    forward over the critical tiles and returns ``(out, lse, kept, visited, recall_bound)``.
    ``planned=False`` (a backward given the forward's kept and marginal tiles) builds no plan:
    ``plan`` and ``sparse`` are then None.
    With a projection (or a float32 caller of bfloat16 compute) ``out`` comes in float32 (the
    accumulation dtype; float64 on the reference), so the merge never sees O_s rounded to 16 bits.
    """
    check_rule(skip)
    eps = _check_sla_options(linear, feature_map, eps)
    call = _prepare(q, k, v, scale=scale, block=_block_or_plans(block, plan), layout=layout,
                    backend=backend, threads=threads, check_finite=check_finite,
                    precision=precision)
    weight, bias = _check_projection(call, proj_weight, proj_bias)
    if not planned:
        return call, None, weight, bias, eps, None
    if plan is not None:
        plan = _given_plan(plan, call, None, order, block,
                           extra_selector=critical is not None or negligible is not None)
    else:
        if critical is None or negligible is None:
            raise TypeError("sla_attention needs critical and negligible (or a plan)")
        order = _check_order(order, skip, peak)
        plan = _plan(call, SlaSplit(critical, negligible), order, peak, linear)
    out_dtype = _kernel_out_dtype(call)
    if call.arrays.q.dtype.itemsize == 2 and (weight is not None or bias is not None):
        out_dtype = (weight if weight is not None else bias).dtype

    def sparse(want_stats):
        return _forward(call, plan, skip, want_stats, out_dtype)

    return call, plan, weight, bias, eps, sparse


@on_caller_stream
def sla_attention(q, k, v, *, critical=None, negligible=None, linear="marginal",
                  feature_map="softmax", proj_weight=None, proj_bias=None, eps=None, block=None,
                  skip=None, order=None, peak=4, scale=None, layout="bhnd", backend="auto",
                  return_stats=False, threads=None, check_finite=None, plan=None,
                  precision=None):
    """Sparse + linear attention (SLA): exact on critical tiles, linear on marginal ones.

    Per query tile, the top ``floor(critical * nk)`` key tiles by block score (at least one)
    go through the fused sparse kernel; the bottom ``floor(negligible * nk)`` are dropped; the
    rest (the marginal tiles) feed a linear-attention branch whose output is projected:
    ``O = O_s + O_l W^T + b``. With ``W`` and ``b`` zero (the default) this equals sparse-only
    attention over the critical tiles.

    Parameters
    ----------
    q, k, v : arrays
        As in :func:`attention`.
    critical : float
        Share of key tiles computed exactly, in ``(0, 1]`` (required unless ``plan``).
    negligible : float
        Share of key tiles dropped, in ``[0, 1)``; critical wins an overlap (required unless
        ``plan``).
    linear : {"marginal", "complement", "global"}
        Which tiles feed the linear branch: the marginal ones, every non-critical one, or all.
    feature_map : {"softmax", "elu1", "relu"}
        phi applied to q and k along the head dimension.
    proj_weight : array ``(D, D)``, optional
        ``W``, shared across heads; zero when None (then the linear branch is not computed).
        Used in float64 where the branch computes in float64 (the reference backend, float64
        inputs on ``cpu``), else in float32 (a float64 ``W`` with 16-bit or float32 inputs is
        rounded to float32, never to the inputs' dtype; on the GPU its product runs on TF32
        tensor cores with float32 accumulation).
    proj_bias : array ``(D,)``, optional
        ``b``; zero when None. Same precision as ``W``.
    eps : float, optional
        Added to the linear branch's denominator; 0 by default, 1e-5 for ``linear="global"``.
    block, skip, order, peak, scale, layout, backend, return_stats, threads, check_finite
        As in :func:`attention` (the skip rule acts on the critical tiles). GPU arrays ``W``
        and ``b`` are not checked for NaN (that would synchronise with the host).
    plan : Plan, optional
        A previous call's ``stats.plan`` (critical lists and ``marginal`` tiles), used as given;
        ``critical`` and ``negligible`` must then be None. A plan without ``marginal`` (from
        :meth:`Plan.from_kept`) sends no tile to the linear branch.
    precision : {None, "bf16"}
        As in :func:`attention`.

    Returns
    -------
    out : array
        Same shape, layout, dtype and namespace as ``q``: ``O_s``, ``O_l W^T`` and ``b`` are
        added in the accumulation dtype and rounded once.
    stats : AttentionStats
        Only with ``return_stats=True``; ``marginal`` holds the linear-branch tiles.
    """
    return_stats = check_flag("return_stats", return_stats)
    call, plan, weight, bias, eps, sparse = _sla_forward(
        q, k, v, critical, negligible, linear, feature_map, proj_weight, proj_bias, eps, block,
        skip, order, peak, scale, layout, backend, threads, check_finite, plan, precision)
    a = call.arrays
    out, lse, kept, visited, bound = sparse(return_stats)
    out = _linear.sla_output(call.backend, a.q, a.k, a.v, out, plan.marginal, call.block,
                             feature_map, eps, weight, bias, call.out_dtype or a.q.dtype,
                             mode=linear, **call.kwargs())
    result = call.result(out)
    if not return_stats:
        return result
    return result, _stats(call, plan, lse, kept, visited, bound, marginal=plan.marginal)


def _density_bound(plan, select, nq, nk):
    """A host-known bound on the kept share of tiles (the backward's kernel choice): the plan's
    list capacity, else the selector's static row bound, else None (unknown)."""
    if plan is not None:
        return plan.capacity / (nq * nk)
    if isinstance(select, (TopK, SlaSplit)):
        return max_visits_of(select, nk) / nk
    return None


def _grads_out(call: _Call, grads):
    dtype = _grad_dtype(call)
    return tuple(call.arrays.from_canonical(g.astype(dtype, copy=False)) for g in grads)


def _grad_dtype(call: _Call):
    """The dtype of the gradients the caller gets: that of q as the caller gave it."""
    return call.out_dtype if call.out_dtype is not None else call.arrays.q.dtype


def _check_saved_array(call: _Call, name, x):
    """``x`` on the backend's device, checked to come from the namespace and device of q."""
    a = call.arrays
    check_array(name, x)
    if on_cuda(x) != a.inputs_on_gpu:
        raise ValueError(f"{name} must live on the device of q (the forward's saved tensor)")
    if a.namespace and namespace_of(x) != a.namespace:
        raise TypeError(f"{name} must come from the array namespace of q ({a.namespace}), got "
                        f"{type(x).__module__}.{type(x).__name__}")
    return as_backend_array(name, x, a.on_gpu)


def _saved_tensors(call: _Call, out, lse, kept):
    """The forward's saved ``out`` and ``lse`` in canonical form, or None where not given.

    ``out`` keeps its dtype (the forward's output dtype, that of the caller's q), shaped like
    q in the call's layout; ``lse`` is ``stats.lse`` exactly as the forward returned it
    (``(B, H, Nq)``, or ``(B, Nq, H)`` with ``layout="bnhd"``), float32 or float64, and comes
    back contiguous ``(B, H, Nq)`` in the accumulation dtype (float64 for float64 inputs).
    They describe one kept set, so ``kept`` is required with them.
    """
    if out is None and lse is None:
        return None, None
    if kept is None:
        given = " and ".join(n for n, x in (("out", out), ("lse", lse)) if x is not None)
        raise ValueError(f"{given}: the forward's saved tensors describe its kept set; pass "
                         "kept=stats.kept with them")
    a = call.arrays
    B, H, Nq, _ = a.q.shape
    xp = a.xp
    if out is not None:
        out = _check_saved_array(call, "out", out)
        _check_rank_and_dtype("out", out, a.layout, a.input_dtype_name or a.dtype_name)
        if a.layout == "bnhd":
            out = xp.swapaxes(out, 1, 2)
        if tuple(out.shape) != tuple(a.q.shape):
            raise ValueError(f"out must have the shape of q, got {tuple(out.shape)} in "
                             f"(B, H, N, D) order for {tuple(a.q.shape)}")
        if not a.on_gpu:
            _check_finite(xp, "out", out)
    if lse is not None:
        lse = _check_saved_array(call, "lse", lse)
        expected = (B, Nq, H) if a.layout == "bnhd" else (B, H, Nq)
        if lse.ndim != 3 or tuple(lse.shape) != expected:
            axes = "(B, Nq, H)" if a.layout == "bnhd" else "(B, H, Nq)"
            raise ValueError(f"lse must be the forward's stats.lse of shape {axes} = "
                             f"{expected}, got {tuple(lse.shape)}")
        if float_dtype_name(lse.dtype) not in ("float32", "float64"):
            raise TypeError(f"lse must be float32 or float64 (the forward's stats.lse), got "
                            f"{lse.dtype}")
        if a.layout == "bnhd":
            lse = xp.swapaxes(lse, 1, 2)
        acc = xp.float64 if a.q.dtype == xp.float64 else xp.float32
        lse = xp.ascontiguousarray(lse, dtype=acc)
        if not a.on_gpu and not bool(xp.all(xp.isfinite(lse))):
            raise ValueError("lse contains NaN or infinity (a row of the forward's kept set "
                             "always has a finite log-sum-exp)")
    return out, lse


def _forward_for_backward(call: _Call, plan, skip):
    """``(out, lse, kept)`` of the forward a vjp needs when no kept set is given; ``out`` in
    the accumulation dtype (float32 for 16-bit inputs), so the backward's row sums see it
    unrounded."""
    wide = None if call.arrays.q.dtype.itemsize >= 4 else np.float32
    out, lse, kept, _, _ = _forward(call, plan, skip, True, wide)
    return out, lse, kept


@on_caller_stream
def attention_vjp(q, k, v, do, *, select=None, skip=None, order=None, peak=4, scale=None,
                  block=None, layout="bhnd", backend="auto", kept=None, threads=None,
                  plan=None, precision=None, out=None, lse=None, deterministic=False):
    """Gradients of :func:`attention` with the plan and kept set held fixed.

    The function differentiated is attention restricted to the tiles whose P.V the forward
    accumulated (``kept``); give ``kept`` (from a forward's stats) to replay it, or leave it
    None to run the forward here.

    What is recomputed: with ``kept``, ``out`` and ``lse`` (what an autograd bridge saves)
    nothing of the forward is; with ``kept`` alone the backend recomputes the forward's
    output and log-sum-exp over the kept tiles inside its backward (the ``cpu`` backend
    recomputes only the one that is missing); without ``kept`` the forward runs once here and
    its output and LSE are handed to the backward. The ``reference`` backend, the float64
    oracle, always recomputes both in float64 and ignores ``out`` and ``lse``.

    Parameters
    ----------
    q, k, v : arrays
        As in :func:`attention`.
    do : array
        Cotangent of the output, shaped like ``q``.
    kept : bool array ``(B, H, nq, nk)``, optional
        The forward's kept tiles.
    plan : Plan, optional
        The forward's plan (``stats.plan``), used when ``kept`` is None to rerun the forward
        without re-selecting.
    out : array, optional
        The forward's output for this ``kept`` (shape, layout, dtype and namespace of ``q``);
        requires ``kept``.
    lse : array, optional
        The forward's ``stats.lse`` for this ``kept``: ``(B, H, Nq)``, or ``(B, Nq, H)`` with
        ``layout="bnhd"``, float32 or float64, natural log; requires ``kept``. Saved tensors
        of another kept set give wrong gradients (they are not checked against ``kept``).
    deterministic : bool
        Bitwise run-to-run reproducible gradients. The ``cpu`` and ``reference`` backends
        always are (each output row has one owner, no atomics); on the GPU it asks the
        backward for a dQ without order-dependent accumulation (atomics, or on Hopper bulk
        reductions): a separate query-major pass, slower (docs/design.rst section 7).
    select, skip, order, peak, scale, block, layout, backend, threads, precision
        As in :func:`attention`.

    Returns
    -------
    dq, dk, dv : arrays
        In the dtype, layout and namespace of the inputs.
    """
    deterministic = check_flag("deterministic", deterministic)
    call = _prepare(q, k, v, scale=scale, block=_block_or_plans(block, plan), layout=layout,
                    backend=backend, threads=threads, precision=precision, check_finite=None)
    g = call.arrays.like_q("do", do)
    a = call.arrays
    nq, nk = tile_count(a.q.shape[2], call.block[0]), tile_count(a.k.shape[2], call.block[1])
    check_rule(skip)
    out, lse = _saved_tensors(call, out, lse, kept)
    if plan is not None:
        plan = _given_plan(plan, call, select, order, block)
    if kept is None:
        if plan is None:
            plan = _plan(call, _check_selector(select, call.arrays, call.block),
                         _check_order(order, skip, peak), peak)
        out, lse, kept = _forward_for_backward(call, plan, skip)
    # Checked on the host only (on the GPU it would read a flag back).
    kept = check_tile_mask("kept", kept, (a.q.shape[0], a.q.shape[1], nq, nk), a.on_gpu,
                           nonempty=not a.on_gpu)
    grads = call.backend.attention_backward(
        a.q, a.k, a.v, g, kept, call.block, call.scale, out=out, lse=lse,
        deterministic=deterministic, grad_dtype=np.dtype(_grad_dtype(call)),
        density=_density_bound(plan, select, nq, nk), **call.kwargs())
    return _grads_out(call, grads)


@on_caller_stream
def sla_vjp(q, k, v, do, *, critical=None, negligible=None, linear="marginal",
            feature_map="softmax", proj_weight=None, proj_bias=None, eps=None, block=None,
            skip=None, order=None, peak=4, scale=None, layout="bhnd", backend="auto", kept=None,
            threads=None, plan=None, precision=None, out=None, lse=None, deterministic=False,
            marginal=None):
    """Gradients of :func:`sla_attention`: ``(dq, dk, dv, dW, db)``.

    The plan (critical and marginal tiles) and the sparse branch's kept set are held fixed.
    ``dW`` and ``db`` are returned even when ``proj_weight``/``proj_bias`` are None (the
    gradient at zero, what fine-tuning from the zero initialisation needs).

    What is recomputed: the plan, unless ``plan`` is given (it holds the marginal tiles) or
    ``kept`` and ``marginal`` are (then no plan is needed); the linear branch ``O_l`` always (it is needed for ``dW`` anyway). The sparse branch:
    with ``kept``, ``out`` and ``lse`` no sparse forward runs and its output is derived as
    ``O_s = out - (O_l W^T + b)`` in the accumulation dtype from the ``O_l`` computed here
    (on the GPU only its ``rowsum(dO * O_s)``, all the sparse backward uses it for);
    with ``kept`` alone the sparse backward recomputes ``O_s`` and its LSE over the kept
    tiles (``out`` alone or ``lse`` alone: only the other one); without ``kept`` the sparse
    forward runs once and its output and LSE go to the backward. The ``reference`` backend
    always recomputes in float64 and ignores ``out`` and ``lse``.

    Parameters
    ----------
    q, k, v, do : arrays
        As in :func:`attention_vjp`.
    critical, negligible, linear, feature_map, proj_weight, proj_bias, eps
        As in :func:`sla_attention`.
    kept : bool array, optional
        The forward's kept critical tiles (``stats.kept``); when given, no sparse forward runs
        (only the plan, which holds the marginal tiles, is rebuilt or taken from ``plan``);
        recomputed when None.
    out : array, optional
        The merged output of the forward ``sla_attention(..., return_stats=True)`` for this
        ``kept``, with the same ``proj_weight`` and ``proj_bias``; requires ``kept``.
    lse : array, optional
        That forward's ``stats.lse`` (the sparse branch's LSE), as in :func:`attention_vjp`;
        requires ``kept``.
    deterministic : bool
        As in :func:`attention_vjp` (the linear branch's gradients use no atomics anywhere).
    marginal : bool array, optional
        That forward's marginal tiles (``stats.marginal``), with ``kept``: the two describe the
        forward completely, so no plan is rebuilt (``plan`` must then be None).
    block, skip, order, peak, scale, layout, backend, threads, plan, precision
        As in :func:`sla_attention`.

    Returns
    -------
    dq, dk, dv : arrays
        In the dtype, layout and namespace of the inputs.
    dW : array ``(D, D)``, db : array ``(D,)``
        float32; float64 on the reference and for float64 inputs on ``cpu``; in the inputs'
        namespace.
    """
    deterministic = check_flag("deterministic", deterministic)
    if marginal is not None and (kept is None or plan is not None):
        raise ValueError("marginal describes the forward together with its kept set: pass "
                         "kept=stats.kept with it, and no plan")
    call, plan, weight, bias, eps, sparse = _sla_forward(
        q, k, v, critical, negligible, linear, feature_map, proj_weight, proj_bias, eps, block,
        skip, order, peak, scale, layout, backend, threads, None, plan, precision,
        planned=marginal is None)
    a = call.arrays
    g = a.like_q("do", do)
    B, H = a.q.shape[:2]
    nq, nk = tile_count(a.q.shape[2], call.block[0]), tile_count(a.k.shape[2], call.block[1])
    out, lse = _saved_tensors(call, out, lse, kept)
    o_sparse = None
    if kept is None:  # only what is missing: a given kept set costs no forward
        o_sparse, lse, kept, _, _ = sparse(True)
    kept = check_tile_mask("kept", kept, (B, H, nq, nk), a.on_gpu, nonempty=not a.on_gpu)
    if plan is not None:
        marginal, density = plan.marginal, plan.capacity / (nq * nk)
    else:
        marginal = check_tile_mask("marginal", marginal, (B, H, nq, nk), a.on_gpu)
        density = (max_visits_of(SlaSplit(critical, negligible), nk) / nk
                   if critical is not None and negligible is not None else None)
    acc = _linear.accumulator(a.xp, a.q.dtype, exact=call.backend_name == "reference")
    linear_grads, d_weight, d_bias, derived = _linear.linear_vjp(
        call.backend, a.q, a.k, a.v, g, marginal, call.block, feature_map, eps, weight, acc,
        mode=linear, bias=bias, out=out, **call.kwargs())
    if o_sparse is None:
        o_sparse = derived
    # The linear side's gradients are added inside the sparse backward's stores: one rounding
    # of the sum, no separate pass over three gradient-sized arrays.
    grads = call.backend.attention_backward(
        a.q, a.k, a.v, g, kept, call.block, call.scale, out=o_sparse, lse=lse,
        deterministic=deterministic, grad_dtype=np.dtype(_grad_dtype(call)),
        addend=linear_grads, density=density, **call.kwargs())
    return _grads_out(call, grads) + (a.to_caller(d_weight), a.to_caller(d_bias))


@on_caller_stream
def block_scores(q, k, *, block=(64, 64), scale=None, layout="bhnd"):
    """Block scores: mean-pooled query tiles against centred mean-pooled key tiles.

    ``S_IJ = scale * qbar_I . (kbar_J - mean_J kbar_J)`` (docs/design.rst section 3).

    Parameters
    ----------
    q : array ``(B, Hq, Nq, D)``
    k : array ``(B, Hkv, Nk, D)``
    block : (int, int)
        Tile sizes; tiles are mean-pooled over their valid rows.
    scale : float, optional
        ``D ** -0.5`` by default.
    layout : {"bhnd", "bnhd"}

    Returns
    -------
    scores : array ``(B, Hq, nq, nk)``
        float64 for host inputs, float32 for GPU inputs, in the inputs' namespace.
    """
    block = check_block(block)
    arrays = canonicalize({"q": q, "k": k, "v": k}, layout=layout)
    scale = check_scale(scale, arrays.q.shape[-1])
    xp = arrays.xp
    acc = xp.float32 if arrays.on_gpu else xp.float64
    scores = _block_scores(xp, arrays.q.astype(acc), arrays.k.astype(acc), block, scale)
    return arrays.to_caller(scores)


def recall(q, k, kept, *, block=(64, 64), scale=None, layout="bhnd"):
    """Exact float64 recall: each row's share of softmax mass inside the tiles of ``kept``.

    Parameters
    ----------
    q, k : arrays
        As in :func:`attention`.
    kept : bool array ``(B, Hq, nq, nk)``
        A kept-tile set, e.g. ``stats.kept``.
    block : (int, int)
    scale : float, optional
    layout : {"bhnd", "bnhd"}

    Returns
    -------
    recall : float64 array ``(B, Hq, Nq)``
        On the host as NumPy for host inputs; in the inputs' namespace otherwise.

    Examples
    --------
    >>> import numpy as np, pysparse_attn as psa
    >>> rng = np.random.default_rng(1)
    >>> q, k = rng.standard_normal((2, 1, 1, 40, 8))
    >>> kept = np.ones((1, 1, 3, 3), dtype=bool)
    >>> np.allclose(psa.recall(q, k, kept, block=(16, 16)), 1.0)
    True
    """
    from ._reference import recall_of_kept

    block = check_block(block)
    arrays = canonicalize({"q": q, "k": k, "v": k}, layout=layout, device="host")
    scale = check_scale(scale, arrays.q.shape[-1])
    nq = tile_count(arrays.q.shape[2], block[0])
    nk = tile_count(arrays.k.shape[2], block[1])
    kept = check_tile_mask("kept", kept, (arrays.q.shape[0], arrays.q.shape[1], nq, nk), False)
    result = recall_of_kept(arrays.q, arrays.k, kept, block, scale)
    return arrays.from_canonical(result)
