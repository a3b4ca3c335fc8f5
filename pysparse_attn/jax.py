"""JAX adapter: pysparse_attn as differentiable functions that work under ``jit``, ``grad``, ``vmap``.

Import it only where JAX is installed (``pip install 'pysparse_attn[jax]'``); the rest of the
library never imports JAX.

:func:`attention` and :func:`sla_attention` take the arguments of
:func:`pysparse_attn.attention` and :func:`pysparse_attn.sla_attention`. Each is a
``jax.custom_vjp`` function whose forward and backward are ``jax.pure_callback`` calls into the
core: the forward returns ``out``, ``lse`` and the kept set (and the SLA marginal set), the
backward replays that kept set through :func:`pysparse_attn.attention_vjp` /
:func:`pysparse_attn.sla_vjp`, so ``jax.grad`` differentiates the function actually computed.
The callbacks declare their result shapes and dtypes up front, so they trace under ``jax.jit``;
``lse``, ``kept`` and ``marginal`` get no gradient.

``jax.vmap``: the callbacks receive the mapped axes as extra leading axes. Attention folds them
into the batch axis (one core call: attention is independent per batch element); SLA calls the
core once per mapped element, because ``W`` and ``b`` (and their gradients) may differ per
element.

**Where it runs, and the GPU.** Host arrays go through ``jax.pure_callback``: the callback
receives NumPy arrays and the core runs on the ``cpu`` backend. GPU arrays, where
:func:`device_route` says ``"buffer_callback"`` (``jax.experimental.buffer_callback`` present,
as in JAX 0.7 and later, a GPU backend, CuPy importable), stay on the device: the call is staged
into the compiled computation as a ``buffer_callback`` that runs on XLA's own CUDA stream
(``ctx.stream``, entered as a CuPy ``ExternalStream``), imports the input buffers with
``cupy.from_dlpack`` (zero copy), runs the core's ``cupy`` backend and copies each result into
its output buffer on that stream. Which route a call takes is decided per lowering platform
(``jax.lax.platform_dependent``), so one jitted function serves CPU and GPU arrays. The ``cupy``
backend's backward runs on the device too (its own kernels, see
:mod:`pysparse_attn.backends.cupy`); the route adds no copy of its own.

**Options.** Non-array options (selector, rule, scalars) are static: they are encoded once per
call into a hashable :class:`pysparse_attn._adapters.Options` passed as a non-differentiable
argument. A ``BlockMask`` mask must be concrete (a NumPy array or a concrete JAX array), not a
traced value.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

try:
    import jax
    import jax.numpy as jnp
except ImportError as error:  # pragma: no cover - exercised only without JAX
    raise ImportError("pysparse_attn.jax needs JAX; install the extra: "
                      "pip install 'pysparse_attn[jax]'") from error

import numpy as np

from . import _adapters
from ._select import BlockMask

try:  # JAX >= 0.7; older versions serve every array through the host
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - depends on the JAX version
    _buffer_callback = None

__all__ = ["attention", "sla_attention", "AttentionStats", "device_route"]

_DTYPES = ("float64", "float32", "float16", "bfloat16")
_LAYOUTS = ("bhnd", "bnhd")


class AttentionStats(NamedTuple):
    """What :func:`attention` / :func:`sla_attention` report with ``return_stats=True``.

    Attributes
    ----------
    lse : Array ``(B, H, Nq)`` (``(B, Nq, H)`` with ``layout="bnhd"``)
        float64 for float64 inputs, float32 otherwise.
    kept : bool Array ``(B, H, nq, nk)``
        Tiles whose P.V was accumulated.
    marginal : bool Array ``(B, H, nq, nk)`` or None
        SLA only: tiles sent to the linear branch.
    """

    lse: jax.Array
    kept: jax.Array
    marginal: Optional[jax.Array] = None


class _Static:
    """The non-differentiable, non-array part of a call: options and a concrete mask."""

    def __init__(self, options, mask=None):
        self.options = options
        self.mask = mask

    def __hash__(self):
        return hash((self.options, id(self.mask)))

    def __eq__(self, other):
        return (isinstance(other, _Static) and self.options == other.options
                and self.mask is other.mask)


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def _tiles(static, q, k):
    B, H, n_queries, _ = q.shape
    nq, nk = _adapters.tile_counts(static.options, n_queries, k.shape[2])
    return (B, H, nq, nk)


def _fold(xp, x, lead):
    """``x`` with its mapped leading axes ``lead`` folded into the batch axis."""
    x = np.asarray(x) if xp is np else x  # host callbacks may receive jax.Arrays
    return xp.ascontiguousarray(xp.broadcast_to(x, lead + x.shape[len(lead):])).reshape(
        (-1,) + x.shape[len(lead) + 1:])


def _unfold(x, lead):
    return x.reshape(lead + (-1,) + x.shape[1:])


# ---------------------------------------------------------------------------------------------
# The core calls, on NumPy (host) or CuPy (device) arrays: ``xp`` is the namespace. These are
# the only places the core is called; the routes below only move the arrays.

def _folded_mask(xp, static, q, k, lead):
    """The BlockMask mask (in ``xp``), repeated over the mapped elements folded into the batch."""
    if static.mask is None:
        return None
    mask = xp.asarray(static.mask)
    if not lead:
        return mask
    core_q, core_k = q[(0,) * len(lead)], k[(0,) * len(lead)]
    mask = xp.broadcast_to(mask, _tiles(static, core_q, core_k))
    return xp.ascontiguousarray(xp.tile(mask, (math.prod(lead), 1, 1, 1)))


def _attention_run(static):
    def run(xp, q, k, v):
        lead = q.shape[:-4]
        results = _adapters.call_attention(_fold(xp, q, lead), _fold(xp, k, lead),
                                           _fold(xp, v, lead),
                                           _folded_mask(xp, static, q, k, lead), static.options)
        return tuple(_unfold(r, lead) for r in results)
    return run


def _attention_vjp_run(static):
    def run(xp, q, k, v, d_out, kept, out, lse):
        lead = q.shape[:-4]
        f = [_fold(xp, x, lead) for x in (q, k, v, d_out, kept, out, lse)]
        grads = _adapters.call_attention_vjp(*f[:5], _folded_mask(xp, static, q, k, lead),
                                             static.options, out=f[5], lse=f[6])
        return tuple(_unfold(g, lead) for g in grads)
    return run


def _per_element(xp, function, arrays, n_core_dims):
    """Call ``function`` once per mapped element; stack each result along the mapped axes."""
    arrays = [np.asarray(a) if xp is np else a for a in arrays]
    lead = np.broadcast_shapes(*(a.shape[:a.ndim - d] for a, d in zip(arrays, n_core_dims)))
    if not lead:
        return function(*arrays)
    pieces = []
    for index in np.ndindex(*lead):
        element = []
        for a, d in zip(arrays, n_core_dims):
            a = xp.broadcast_to(a, lead + a.shape[a.ndim - d:])
            element.append(xp.ascontiguousarray(a[index]))
        pieces.append(function(*element))
    return tuple(xp.stack([p[i] for p in pieces]).reshape(lead + pieces[0][i].shape)
                 for i in range(len(pieces[0])))


def _sla_run(static):
    def run(xp, q, k, v, weight, bias):
        return _per_element(
            xp, lambda q, k, v, w, b: _adapters.call_sla(q, k, v, w, b, static.options),
            (q, k, v, weight, bias), (4, 4, 4, 2, 1))
    return run


def _sla_vjp_run(static):
    def run(xp, q, k, v, d_out, kept, marginal, weight, bias, out, lse):
        def one(q, k, v, d_out, kept, marginal, weight, bias, out, lse):
            return _adapters.call_sla_vjp(q, k, v, d_out, kept, weight, bias, static.options,
                                          out=out, lse=lse, marginal=marginal)
        return _per_element(xp, one, (q, k, v, d_out, kept, marginal, weight, bias, out, lse),
                            (4, 4, 4, 4, 4, 4, 2, 1, 4, 3))
    return run


# ---------------------------------------------------------------------------------------------
# Routes: pure_callback through the host, or buffer_callback on the device

def device_route():
    """How this process serves JAX GPU arrays: ``"buffer_callback"``, or None.

    ``"buffer_callback"`` when ``jax.experimental.buffer_callback`` exists (JAX >= 0.7), JAX
    has a GPU backend and CuPy imports: on the GPU the call then runs inside the compiled
    computation on XLA's own CUDA stream, on the device buffers (zero copy, through DLPack).
    None otherwise: every call goes through ``jax.pure_callback`` and the host.
    """
    if _buffer_callback is None:
        return None
    try:
        jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this JAX
        return None
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return "buffer_callback"


def _buffer_platforms():
    """Lowering platforms whose calls take the buffer_callback route."""
    return ("cuda",) if device_route() else ()


def _in_place(run, platform):
    """A buffer_callback body: ``run`` on the buffers, results written into ``outs``."""
    def callback(ctx, outs, *args):
        if platform == "cpu":
            results = run(np, *(np.asarray(a) for a in args))
            for out, result in zip(outs, results):
                np.asarray(out)[...] = result
            return
        import cupy

        try:
            device_id = int(args[0].__dlpack_device__()[1])
        except (AttributeError, TypeError, IndexError):
            device_id = cupy.cuda.Device().id
        with cupy.cuda.Device(device_id), \
                cupy.cuda.ExternalStream(ctx.stream, device_id) as stream:
            # Imported on XLA's stream: DLPack's producer orders its buffers on it.
            arrays = [cupy.from_dlpack(a) for a in args]
            results = run(cupy, *arrays)
            for out, result in zip(outs, results):
                target = cupy.from_dlpack(out)
                if target.nbytes != result.nbytes or not result.flags.c_contiguous:
                    raise RuntimeError(f"pysparse_attn.jax: a result of shape {result.shape} "
                                       f"({result.dtype}) does not fit its declared buffer "
                                       f"{target.shape} ({target.dtype})")
                # A byte copy on XLA's stream: no dtype kernel needed (bfloat16 included).
                cupy.cuda.runtime.memcpyAsync(target.data.ptr, result.data.ptr, result.nbytes,
                                              cupy.cuda.runtime.memcpyDeviceToDevice,
                                              stream.ptr)
    return callback


def _callback(run, shapes, args, vmap_method):
    """``run`` through the route of the platform the computation is lowered for."""
    def host(*arrays):
        return jax.pure_callback(lambda *x: run(np, *x), shapes, *arrays,
                                 vmap_method=vmap_method)

    platforms = _buffer_platforms()
    if not platforms:
        return host(*args)

    def on(platform):
        def device(*arrays):
            return _buffer_callback(_in_place(run, platform), shapes,
                                    vmap_method=vmap_method)(*arrays)
        return device

    return jax.lax.platform_dependent(*args, default=host, **{p: on(p) for p in platforms})


# ---------------------------------------------------------------------------------------------
# custom_vjp functions

def _call_attention(q, k, v, static):
    shapes = (_struct(q.shape, q.dtype),
              _struct(q.shape[:3], _adapters.stats_dtype(q.dtype)),
              _struct(_tiles(static, q, k), bool))
    return _callback(_attention_run(static), shapes, (q, k, v), "broadcast_all")


def _call_attention_vjp(q, k, v, d_out, kept, out, lse, static):
    shapes = tuple(_struct(x.shape, x.dtype) for x in (q, k, v))
    return _callback(_attention_vjp_run(static), shapes, (q, k, v, d_out, kept, out, lse),
                     "broadcast_all")


def _call_sla(q, k, v, weight, bias, static):
    tiles = _tiles(static, q, k)
    shapes = (_struct(q.shape, q.dtype),
              _struct(q.shape[:3], _adapters.stats_dtype(q.dtype)),
              _struct(tiles, bool), _struct(tiles, bool))
    return _callback(_sla_run(static), shapes, (q, k, v, weight, bias), "expand_dims")


def _call_sla_vjp(q, k, v, d_out, kept, marginal, weight, bias, out, lse, static):
    acc = _adapters.stats_dtype(q.dtype)
    D = q.shape[-1]
    shapes = tuple(_struct(x.shape, x.dtype) for x in (q, k, v)) + (
        _struct((D, D), acc), _struct((D,), acc))
    return _callback(_sla_vjp_run(static), shapes,
                     (q, k, v, d_out, kept, marginal, weight, bias, out, lse), "expand_dims")


def _attention_primal(q, k, v, static):
    return _call_attention(q, k, v, static)


def _attention_fwd(q, k, v, static):
    out, lse, kept = _call_attention(q, k, v, static)
    return (out, lse, kept), (q, k, v, out, lse, kept)


def _attention_bwd(static, residuals, cotangents):
    q, k, v, out, lse, kept = residuals
    return _call_attention_vjp(q, k, v, cotangents[0], kept, out, lse, static)


_attention_vjp = jax.custom_vjp(_attention_primal, nondiff_argnums=(3,))
_attention_vjp.defvjp(_attention_fwd, _attention_bwd)


def _sla_primal(q, k, v, weight, bias, static):
    return _call_sla(q, k, v, weight, bias, static)


def _sla_fwd(q, k, v, weight, bias, static):
    results = _call_sla(q, k, v, weight, bias, static)
    out, lse, kept, marginal = results
    return results, (q, k, v, weight, bias, out, lse, kept, marginal)


def _sla_bwd(static, residuals, cotangents):
    q, k, v, weight, bias, out, lse, kept, marginal = residuals
    dq, dk, dv, d_weight, d_bias = _call_sla_vjp(q, k, v, cotangents[0], kept, marginal, weight,
                                                 bias, out, lse, static)
    return dq, dk, dv, d_weight.astype(weight.dtype), d_bias.astype(bias.dtype)


_sla_vjp = jax.custom_vjp(_sla_primal, nondiff_argnums=(5,))
_sla_vjp.defvjp(_sla_fwd, _sla_bwd)


# ---------------------------------------------------------------------------------------------
# Public functions

def _check_arrays(named):
    out = []
    for name, x in named:
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(f"{name} must be a JAX or NumPy array, got {type(x).__name__}")
        x = jnp.asarray(x)
        if x.dtype.name not in _DTYPES:
            raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got "
                            f"{x.dtype}")
        out.append(x)
    return out


def _check_layout(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")


def _check_rank(named):
    for name, x in named:
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(x.shape)}")


def _concrete_mask(mask):
    if isinstance(mask, jax.core.Tracer):
        raise TypeError("select: a BlockMask mask must be concrete (a NumPy array), not a "
                        "traced JAX value")
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"select: the BlockMask mask must be a bool array, got {mask.dtype}")
    return mask


def attention(q, k, v, *, select=None, skip=None, layout="bhnd", return_stats=False, **options):
    """Differentiable :func:`pysparse_attn.attention` on JAX arrays (``jit``/``grad``/``vmap``).

    Parameters
    ----------
    q, k, v : jax.Array
        As in :func:`pysparse_attn.attention`: float64 (with ``jax_enable_x64``), float32,
        float16 or bfloat16.
    select : None, BlockMask, TopK or TopP
        Plan-stage selector; a BlockMask's mask must be concrete.
    skip : None, Blasst, Cef or Recall
        In-loop skip rule.
    layout : {"bhnd", "bnhd"}
        Axis order of the inputs and outputs.
    return_stats : bool
        Also return an :class:`AttentionStats`.
    **options
        Any other keyword option of :func:`pysparse_attn.attention` (``order``, ``peak``,
        ``scale``, ``block``, ``threads``, ``check_finite``), static.

    Returns
    -------
    out : jax.Array
        Shape, layout and dtype of ``q``.
    stats : AttentionStats
        Only with ``return_stats=True``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, pysparse_attn as psa, pysparse_attn.jax as pj
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 2, 64, 16))
    >>> loss = lambda q: pj.attention(q, k, v, skip=psa.Blasst(1e-3), block=(16, 16)).sum()
    >>> jax.jit(jax.grad(loss))(q).shape
    (1, 2, 64, 16)
    """
    q, k, v = _check_arrays((("q", q), ("k", k), ("v", v)))
    _check_layout(layout)
    _check_rank((("q", q), ("k", k), ("v", v)))
    mask = _concrete_mask(select.mask) if isinstance(select, BlockMask) else None
    static = _Static(_adapters.make_options("attention", select=select, skip=skip, **options),
                     mask)
    if layout == "bnhd":
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    out, lse, kept = _attention_vjp(q, k, v, static)
    if layout == "bnhd":
        out, lse = jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse, 1, 2)
    return (out, AttentionStats(lse, kept)) if return_stats else out


def sla_attention(q, k, v, *, critical, negligible, proj_weight=None, proj_bias=None,
                  skip=None, layout="bhnd", return_stats=False, **options):
    """Differentiable :func:`pysparse_attn.sla_attention` on JAX arrays.

    Gradients flow to ``q``, ``k``, ``v`` and to ``proj_weight`` / ``proj_bias`` (zero arrays
    of the accumulation dtype stand in for those left None, so their gradient at zero is
    there to fine-tune from).

    Parameters
    ----------
    q, k, v : jax.Array
        As in :func:`attention`.
    critical, negligible : float
        As in :func:`pysparse_attn.sla_attention`.
    proj_weight : jax.Array ``(D, D)``, optional
        ``W``; zero when None.
    proj_bias : jax.Array ``(D,)``, optional
        ``b``; zero when None.
    skip : None, Blasst, Cef or Recall
    layout : {"bhnd", "bnhd"}
    return_stats : bool
    **options
        Any other keyword option of :func:`pysparse_attn.sla_attention` (``linear``,
        ``feature_map``, ``eps``, ``block``, ``order``, ``peak``, ``scale``, ``threads``,
        ``check_finite``), static.

    Returns
    -------
    out : jax.Array
    stats : AttentionStats
        Only with ``return_stats=True``.
    """
    q, k, v = _check_arrays((("q", q), ("k", k), ("v", v)))
    _check_layout(layout)
    _check_rank((("q", q), ("k", k), ("v", v)))
    D = q.shape[-1]
    acc = _adapters.stats_dtype(q.dtype)
    weight = (jnp.zeros((D, D), acc) if proj_weight is None
              else _check_arrays((("proj_weight", proj_weight),))[0])
    bias = (jnp.zeros((D,), acc) if proj_bias is None
            else _check_arrays((("proj_bias", proj_bias),))[0])
    if weight.shape != (D, D):
        raise ValueError(f"proj_weight must have shape {(D, D)}, got {tuple(weight.shape)}")
    if bias.shape != (D,):
        raise ValueError(f"proj_bias must have shape {(D,)}, got {tuple(bias.shape)}")
    static = _Static(_adapters.make_options("sla", skip=skip, critical=critical,
                                            negligible=negligible, **options))
    if layout == "bnhd":
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    out, lse, kept, marginal = _sla_vjp(q, k, v, weight, bias, static)
    if layout == "bnhd":
        out, lse = jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse, 1, 2)
    return (out, AttentionStats(lse, kept, marginal)) if return_stats else out

