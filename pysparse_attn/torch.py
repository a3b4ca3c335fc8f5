"""PyTorch adapter: pysparse_attn as differentiable, compilable torch operators.

Import it only where PyTorch is installed (``pip install 'pysparse_attn[torch]'``); the rest of
the library never imports torch.

:func:`attention` and :func:`sla_attention` take the arguments of
:func:`pysparse_attn.attention` and :func:`pysparse_attn.sla_attention` and run on torch tensors
through four ``torch.library.custom_op`` operators in the ``pysparse_attn`` namespace:

``torch.ops.pysparse_attn.attention(q, k, v, mask, spec) -> (out, lse, kept)``
``torch.ops.pysparse_attn.attention_backward(q, k, v, d_out, kept, mask, out, lse, spec)``
    ``-> (dq, dk, dv)``
``torch.ops.pysparse_attn.sla_attention(q, k, v, proj_weight, proj_bias, spec)``
    ``-> (out, lse, kept, marginal)``
``torch.ops.pysparse_attn.sla_backward(q, k, v, d_out, kept, marginal, proj_weight, proj_bias,``
    ``out, lse, spec) -> (dq, dk, dv, dW, db)``

Each has a fake (meta) implementation with the exact shapes, strides (all outputs contiguous),
dtypes and device of the real one, so ``torch.compile(fullgraph=True)`` traces them without a
graph break, and the forward ops have an autograd formula (``register_autograd``) that saves
``out``, ``lse`` and the kept set and runs the backward op, which replays the kept set
(:func:`pysparse_attn.attention_vjp` / :func:`pysparse_attn.sla_vjp`): the gradient is the one
of the function actually computed. ``lse``, ``kept`` and ``marginal`` are not differentiable.

The operators take canonical ``(B, H, N, D)`` tensors of any strides; the wrappers turn
``layout="bnhd"`` into transposed views (no copy) and back.

**The spec.** A custom op takes tensors, numbers and strings only, so the non-tensor options
(selector, skip rule, order, peak, scale, block, backend, threads, ...) travel as ``spec``, the
canonical JSON text of :class:`pysparse_attn._adapters.Options` (sorted keys, no spaces;
per-head rule parameters as lists of floats; options equal to the core's defaults left out),
for example ``{"keywords":[["block",[16,16]]],"op":"attention","select":null,
"skip":["Recall",[["exact",false],["target",0.95]]]}``. :func:`spec` builds it;
``pysparse_attn._adapters.decode`` is the one decoder. A ``BlockMask`` selector is written as
``"mask"`` and its bool tensor is the ``mask`` argument. Equal options give equal text, so
``torch.compile`` caches one graph per spec.

**Devices.** CPU tensors run on the ``cpu`` backend (the ``reference`` if the extension is not
built), zero-copy through NumPy (bfloat16 too, viewed as ``ml_dtypes.bfloat16``); CUDA tensors
run on the ``cupy`` backend, zero-copy through DLPack, on the tensor's device and torch's
*current* stream there (a CuPy ``ExternalStream``), so the kernels queue behind the caller's
work. Any other device is a ValueError naming the argument.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

try:
    import torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError("pysparse_attn.torch needs PyTorch; install the extra: "
                      "pip install 'pysparse_attn[torch]'") from error

import ml_dtypes
import numpy as np

from . import _adapters
from ._select import BlockMask

# A per-head rule parameter (a NumPy array) cannot be read into Python floats by the tracer of
# torch.compile: that one step runs eagerly at trace time instead (the rule object then
# exists already, built outside the compiled code). See _adapters._fields_with_arrays.
_adapters._fields_with_arrays = torch.compiler.assume_constant_result(
    _adapters._fields_with_arrays)

__all__ = ["attention", "sla_attention", "SparseLinearAttention", "AttentionStats", "spec"]

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")
_LAYOUTS = ("bhnd", "bnhd")


class AttentionStats(NamedTuple):
    """What :func:`attention` / :func:`sla_attention` report with ``return_stats=True``.

    Tensors on the inputs' device (a subset of :class:`pysparse_attn.AttentionStats`, kept as
    tensors so that a compiled graph returns them without a host round trip).

    Attributes
    ----------
    lse : Tensor ``(B, H, Nq)`` (``(B, Nq, H)`` with ``layout="bnhd"``)
        Log-sum-exp over the keys whose P.V was accumulated; float64 for float64 inputs,
        float32 otherwise.
    kept : bool Tensor ``(B, H, nq, nk)``
        Tiles whose P.V was accumulated.
    marginal : bool Tensor ``(B, H, nq, nk)`` or None
        SLA only: tiles sent to the linear branch.
    """

    lse: torch.Tensor
    kept: torch.Tensor
    marginal: Optional[torch.Tensor] = None

    @property
    def density(self) -> torch.Tensor:
        """Share of tiles kept (a 0-d float32 tensor)."""
        return self.kept.float().mean()

    @property
    def sparsity(self) -> torch.Tensor:
        """Share of tiles not kept (a 0-d float32 tensor)."""
        return 1.0 - self.density


# ---------------------------------------------------------------------------------------------
# Tensors to core arrays and back (zero copy)

def _to_core(x):
    """A tensor as a NumPy (CPU) or CuPy (CUDA) array sharing its memory."""
    x = x.detach()
    if x.device.type == "cpu":
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: view the bits as ml_dtypes'
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    import cupy

    return cupy.from_dlpack(x)


def _from_core(array):
    """A NumPy or CuPy result as a tensor sharing its memory."""
    if isinstance(array, np.ndarray):
        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    return torch.from_dlpack(array)


def _optional(x):
    return None if x is None else _to_core(x)


@contextlib.contextmanager
def _on_device(device):
    """Run CuPy work on ``device`` and torch's current stream there; nothing for the CPU."""
    if device.type != "cuda":
        yield
        return
    import cupy

    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream,
                                                                   device.index):
        yield


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Operators

@torch.library.custom_op("pysparse_attn::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: Optional[torch.Tensor], spec: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = _adapters.decode(spec)
    with _on_device(q.device):
        results = _adapters.call_attention(_to_core(q), _to_core(k), _to_core(v),
                                           _optional(mask), options)
        return tuple(_from_core(r) for r in results)


@_attention_op.register_fake
def _attention_fake(q, k, v, mask, spec):
    B, H, n_queries, _ = q.shape
    nq, nk = _adapters.tile_counts(_adapters.decode(spec), n_queries, k.shape[2])
    return (q.new_empty(q.shape), q.new_empty((B, H, n_queries), dtype=_stats_dtype(q.dtype)),
            q.new_empty((B, H, nq, nk), dtype=torch.bool))


@torch.library.custom_op("pysparse_attn::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           d_out: torch.Tensor, kept: torch.Tensor,
                           mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                           spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = _adapters.decode(spec)
    with _on_device(q.device):
        grads = _adapters.call_attention_vjp(
            _to_core(q), _to_core(k), _to_core(v), _to_core(d_out), _to_core(kept),
            _optional(mask), options, out=_to_core(out), lse=_to_core(lse))
        return tuple(_from_core(g) for g in grads)


@_attention_backward_op.register_fake
def _attention_backward_fake(q, k, v, d_out, kept, mask, out, lse, spec):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, mask, spec = inputs
    out, lse, kept = output
    ctx.save_for_backward(q, k, v, mask, out, lse, kept)
    ctx.spec = spec
    ctx.mark_non_differentiable(lse, kept)


def _attention_backward(ctx, d_out, d_lse, d_kept):
    q, k, v, mask, out, lse, kept = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(q, k, v, d_out, kept, mask, out, lse, ctx.spec)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("pysparse_attn::sla_attention", mutates_args=())
def _sla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor], spec: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = _adapters.decode(spec)
    with _on_device(q.device):
        results = _adapters.call_sla(_to_core(q), _to_core(k), _to_core(v),
                                     _optional(proj_weight), _optional(proj_bias), options)
        return tuple(_from_core(r) for r in results)


@_sla_op.register_fake
def _sla_fake(q, k, v, proj_weight, proj_bias, spec):
    B, H, n_queries, _ = q.shape
    nq, nk = _adapters.tile_counts(_adapters.decode(spec), n_queries, k.shape[2])
    return (q.new_empty(q.shape), q.new_empty((B, H, n_queries), dtype=_stats_dtype(q.dtype)),
            q.new_empty((B, H, nq, nk), dtype=torch.bool),
            q.new_empty((B, H, nq, nk), dtype=torch.bool))


@torch.library.custom_op("pysparse_attn::sla_backward", mutates_args=())
def _sla_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d_out: torch.Tensor,
                     kept: torch.Tensor, marginal: torch.Tensor,
                     proj_weight: Optional[torch.Tensor], proj_bias: Optional[torch.Tensor],
                     out: torch.Tensor, lse: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    options = _adapters.decode(spec)
    with _on_device(q.device):
        grads = _adapters.call_sla_vjp(
            _to_core(q), _to_core(k), _to_core(v), _to_core(d_out), _to_core(kept),
            _optional(proj_weight), _optional(proj_bias), options, out=_to_core(out),
            lse=_to_core(lse), marginal=_to_core(marginal))
        return tuple(_from_core(g) for g in grads)


@_sla_backward_op.register_fake
def _sla_backward_fake(q, k, v, d_out, kept, marginal, proj_weight, proj_bias, out, lse, spec):
    D = q.shape[-1]
    acc = _stats_dtype(q.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((D, D), dtype=acc), q.new_empty((D,), dtype=acc))


def _sla_setup_context(ctx, inputs, output):
    q, k, v, proj_weight, proj_bias, spec = inputs
    out, lse, kept, marginal = output
    ctx.save_for_backward(q, k, v, proj_weight, proj_bias, out, lse, kept, marginal)
    ctx.spec = spec
    ctx.mark_non_differentiable(lse, kept, marginal)


def _sla_backward(ctx, d_out, d_lse, d_kept, d_marginal):
    q, k, v, proj_weight, proj_bias, out, lse, kept, marginal = ctx.saved_tensors
    dq, dk, dv, d_weight, d_bias = _sla_backward_op(q, k, v, d_out, kept, marginal, proj_weight,
                                                    proj_bias, out, lse, ctx.spec)
    d_weight = None if proj_weight is None else d_weight.to(proj_weight.dtype)
    d_bias = None if proj_bias is None else d_bias.to(proj_bias.dtype)
    return dq, dk, dv, d_weight, d_bias, None


_sla_op.register_autograd(_sla_backward, setup_context=_sla_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions

def spec(op, select=None, skip=None, **options) -> str:
    """The ``spec`` text of an operator call (see the module docstring).

    Plain Python that ``torch.compile`` traces: the text becomes a constant of the graph,
    guarded on the options it was built from (options built inside the compiled function
    included).

    Parameters
    ----------
    op : {"attention", "sla"}
        Which core function the options are for.
    select : None, BlockMask, TopK or TopP
        Selector (a BlockMask's mask travels separately, as the ``mask`` argument).
    skip : None, Blasst, Cef or Recall
        Skip rule.
    **options
        Any other keyword option of :func:`pysparse_attn.attention` (or of
        :func:`pysparse_attn.sla_attention` for ``op="sla"``: ``critical``, ``negligible``,
        ``linear``, ...), except ``layout``, ``return_stats`` and the projection arrays.

    Returns
    -------
    str
        Canonical JSON text.

    Examples
    --------
    >>> import pysparse_attn as psa, pysparse_attn.torch as pt
    >>> pt.spec("attention", skip=psa.Blasst(1e-3), block=(32, 32))
    '{"keywords":[["block",[32,32]]],"op":"attention","select":null,"skip":["Blasst",[["lam",0.001]]]}'
    """
    return _adapters.make_options(op, select=select, skip=skip, **options).spec()


def _check_tensors(named, device=None):
    """Every tensor a torch tensor of a served device and dtype, all on one device."""
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type not in _DEVICES:
            raise ValueError(f"{name} is on device {x.device}, which pysparse_attn cannot "
                             f"serve; use a CPU or CUDA tensor")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got "
                            f"{x.dtype}")
        device = x.device if device is None else device
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but q is on {device}; q, k, v and the "
                             "projection must share one device")
    return device


def _check_layout(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")


def _canonical(layout, *tensors):
    return tuple(x.transpose(1, 2) for x in tensors) if layout == "bnhd" else tensors


def _mask_tensor(mask, device):
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"select: the BlockMask mask must be a bool tensor, got {mask.dtype}")
        return mask.to(device)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"select: the BlockMask mask must be a bool array, got {mask.dtype}")
    return torch.from_numpy(np.ascontiguousarray(mask)).to(device)


def _attention(q, k, v, mask, options_spec, layout, return_stats):
    """The functional form behind :func:`attention`, with the spec already built."""
    cq, ck, cv = _canonical(layout, q, k, v)
    out, lse, kept = _attention_op(cq, ck, cv, mask, options_spec)
    if layout == "bnhd":
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    return (out, AttentionStats(lse, kept)) if return_stats else out


def attention(q, k, v, *, select=None, skip=None, layout="bhnd", return_stats=False, **options):
    """Differentiable :func:`pysparse_attn.attention` on torch tensors.

    Parameters
    ----------
    q, k, v : Tensor
        As in :func:`pysparse_attn.attention`: CPU or CUDA, float64, float32, float16 or
        bfloat16, any strides; gradients flow to each.
    select : None, BlockMask, TopK or TopP
        Plan-stage selector (a BlockMask's mask may be a bool tensor or array).
    skip : None, Blasst, Cef or Recall
        In-loop skip rule.
    layout : {"bhnd", "bnhd"}
        Axis order of the inputs and outputs.
    return_stats : bool
        Also return an :class:`AttentionStats` (tensors).
    **options
        Any other keyword option of :func:`pysparse_attn.attention`: ``order``, ``peak``,
        ``scale``, ``block``, ``backend``, ``threads``, ``check_finite``.

    Returns
    -------
    out : Tensor
        Shape, layout, dtype and device of ``q``.
    stats : AttentionStats
        Only with ``return_stats=True``.

    Examples
    --------
    >>> import torch, pysparse_attn as psa, pysparse_attn.torch as pt
    >>> q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64, requires_grad=True)
    ...            for _ in range(3))
    >>> out, stats = pt.attention(q, k, v, skip=psa.Recall(0.9), block=(16, 16),
    ...                           return_stats=True)
    >>> out.sum().backward()
    >>> q.grad.shape, stats.kept.shape
    (torch.Size([1, 2, 64, 16]), torch.Size([1, 2, 4, 4]))
    """
    device = _check_tensors((("q", q), ("k", k), ("v", v)))
    _check_layout(layout)
    mask = _mask_tensor(select.mask, device) if isinstance(select, BlockMask) else None
    return _attention(q, k, v, mask, spec("attention", select, skip, **options), layout,
                      return_stats)


def _sla(q, k, v, proj_weight, proj_bias, options_spec, layout, return_stats):
    """The functional form behind :func:`sla_attention`, with the spec already built."""
    cq, ck, cv = _canonical(layout, q, k, v)
    out, lse, kept, marginal = _sla_op(cq, ck, cv, proj_weight, proj_bias, options_spec)
    if layout == "bnhd":
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    return (out, AttentionStats(lse, kept, marginal)) if return_stats else out


def sla_attention(q, k, v, *, critical, negligible, proj_weight=None, proj_bias=None,
                  skip=None, layout="bhnd", return_stats=False, **options):
    """Differentiable :func:`pysparse_attn.sla_attention` on torch tensors.

    Parameters
    ----------
    q, k, v : Tensor
        As in :func:`attention`.
    critical, negligible : float
        Shares of key tiles computed exactly and dropped (see
        :func:`pysparse_attn.sla_attention`).
    proj_weight : Tensor ``(D, D)``, optional
        ``W`` of ``O = O_s + O_l W^T + b``, on the device of ``q``; gets a gradient.
    proj_bias : Tensor ``(D,)``, optional
        ``b``; gets a gradient.
    skip : None, Blasst, Cef or Recall
        Skip rule of the sparse branch.
    layout : {"bhnd", "bnhd"}
    return_stats : bool
        Also return an :class:`AttentionStats` with ``marginal``.
    **options
        Any other keyword option of :func:`pysparse_attn.sla_attention`: ``linear``,
        ``feature_map``, ``eps``, ``block``, ``order``, ``peak``, ``scale``, ``backend``,
        ``threads``, ``check_finite``.

    Returns
    -------
    out : Tensor
        Shape, layout, dtype and device of ``q``.
    stats : AttentionStats
        Only with ``return_stats=True``.
    """
    named = [("q", q), ("k", k), ("v", v)]
    named += [(n, x) for n, x in (("proj_weight", proj_weight), ("proj_bias", proj_bias))
              if x is not None]
    _check_tensors(named)
    _check_layout(layout)
    options_spec = spec("sla", None, skip, critical=critical, negligible=negligible, **options)
    return _sla(q, k, v, proj_weight, proj_bias, options_spec, layout, return_stats)


class SparseLinearAttention(torch.nn.Module):
    """SLA with trainable projection ``W`` (D x D) and bias ``b`` (D), for fine-tuning.

    ``forward(q, k, v)`` computes ``O = O_s + O_l W^T + b`` (:func:`sla_attention`). ``W`` and
    ``b`` start at zero, so an untrained module equals sparse-only attention over the critical
    tiles, and are float32 master weights: they stay float32 when the module is cast to a lower
    precision (``module.to(torch.bfloat16)`` moves them but keeps their dtype, as diffusers'
    ``_keep_in_fp32_modules`` does), so optimizer updates are not rounded to bfloat16. Their
    gradients come from :func:`pysparse_attn.sla_vjp` (float32 for non-float64 inputs).

    Parameters
    ----------
    head_dim : int
        ``D``.
    critical, negligible : float
        As in :func:`pysparse_attn.sla_attention`.
    skip : None, Blasst, Cef or Recall
        Skip rule of the sparse branch.
    layout : {"bhnd", "bnhd"}
        Axis order of ``q``, ``k``, ``v`` and the output.
    dtype : torch.dtype
        Of ``W`` and ``b``: float32 (default) or float64.
    device : torch.device, optional
        Of ``W`` and ``b``.
    **options
        Any other keyword option of :func:`pysparse_attn.sla_attention` (``linear``,
        ``feature_map``, ``eps``, ``block``, ``order``, ``peak``, ``scale``, ``backend``,
        ``threads``, ``check_finite``), fixed at construction.

    Examples
    --------
    >>> import torch, pysparse_attn.torch as pt
    >>> sla = pt.SparseLinearAttention(16, critical=0.25, negligible=0.25, block=(16, 16))
    >>> q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    >>> sla(q, k, v).sum().backward()
    >>> sla.weight.grad.shape, sla.weight.grad.dtype
    (torch.Size([16, 16]), torch.float32)
    """

    def __init__(self, head_dim, critical, negligible, *, skip=None, layout="bhnd",
                 dtype=torch.float32, device=None, **options):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64 (master weights), "
                            f"got {dtype}")
        _check_layout(layout)
        self.head_dim = head_dim
        self.layout = layout
        # Built once: forward hands the compiled graph a constant string.
        self.spec = spec("sla", None, skip, critical=critical, negligible=negligible, **options)
        self.weight = torch.nn.Parameter(torch.zeros(head_dim, head_dim, dtype=dtype,
                                                     device=device))
        self.bias = torch.nn.Parameter(torch.zeros(head_dim, dtype=dtype, device=device))

    def _apply(self, fn, recurse=True):
        master = self.weight.dtype
        module = super()._apply(fn, recurse)
        if self.weight.dtype not in (torch.float32, torch.float64):
            # Why: a model-wide cast to bf16 must not turn the master weights into bf16.
            self.weight.data = self.weight.data.to(master)
            self.bias.data = self.bias.data.to(master)
        return module

    def extra_repr(self):
        return f"head_dim={self.head_dim}, layout={self.layout!r}, spec={self.spec!r}"

    def forward(self, q, k, v, return_stats=False):
        """``sla_attention(q, k, v, proj_weight=W, proj_bias=b, ...)`` with this module's options.

        Parameters
        ----------
        q, k, v : Tensor
            In this module's layout, on the device of ``W``.
        return_stats : bool
            Also return an :class:`AttentionStats`.
        """
        _check_tensors((("q", q), ("k", k), ("v", v), ("proj_weight", self.weight)))
        return _sla(q, k, v, self.weight, self.bias, self.spec, self.layout, return_stats)
