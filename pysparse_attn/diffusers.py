"""diffusers adapter: sparse self-attention for ``WanTransformer3DModel``.

Import it only where diffusers (and PyTorch) are installed
(``pip install 'pysparse_attn[diffusers]'``).

:func:`apply_sparse_attention` swaps the processor of every *self*-attention layer (``attn1``
of each ``WanTransformerBlock``) for a :class:`SparseWanAttnProcessor`, which computes the
same projections, RMS norms and rotary embedding as diffusers' ``WanAttnProcessor`` and then
calls :func:`pysparse_attn.torch.attention` (any selector and skip rule) or, with ``sla=``,
a trainable :class:`pysparse_attn.torch.SparseLinearAttention`. Cross-attention layers
(``attn2``) keep their processor untouched. The returned :class:`WanSparseAttention` holds the
denoising-step counter (the first ``dense_steps`` steps run the stock dense processor, as
deployments of skip-softmax do) and the per-layer statistics.

Why a processor and not a registered diffusers attention backend: backends are a closed enum
(``AttentionBackendName``) chosen globally, and the processor needs per-layer state (the step
counter, statistics, SLA's per-layer ``W`` and ``b``).

The step counter is advanced by the caller (``controller.step = i``, :meth:`advance`) or by a
pipeline hook: pass ``callback_on_step_end=controller.callback_on_step_end`` to a diffusers
pipeline, and call :meth:`WanSparseAttention.reset` before each generation. It counts
denoising steps, not transformer calls, so classifier-free guidance's two calls per step share
one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

try:
    import torch
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
except ImportError as error:  # pragma: no cover - exercised only without diffusers
    raise ImportError("pysparse_attn.diffusers needs diffusers and PyTorch; install the extra: "
                      "pip install 'pysparse_attn[diffusers]'") from error

import numpy as np

from . import _api
from . import torch as psa_torch
from ._select import BlockMask

__all__ = ["apply_sparse_attention", "SparseWanAttnProcessor", "WanSparseAttention",
           "self_attention_qkv",
           "LayerStats"]


@dataclass
class LayerStats:
    """What one self-attention layer did since the last :meth:`WanSparseAttention.reset`.

    Attributes
    ----------
    sparse_calls : int
        Calls that ran pysparse_attn.
    dense_calls : int
        Calls inside the first ``dense_steps`` steps (stock dense attention).
    sparsity : float or None
        Mean over sparse calls of the share of (batch, head, query tile, key tile) tiles whose
        P.V was not accumulated exactly (for SLA: not critical). None before any sparse call.
    recall : float or None
        Mean over sparse calls and rows of the exact softmax mass inside the kept tiles
        (:func:`pysparse_attn.recall`, float64); None unless ``measure_recall``.
    min_recall : float or None
        Lowest row recall seen.
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    sparsity: Optional[float] = None
    recall: Optional[float] = None
    min_recall: Optional[float] = None


class _Accumulator:
    """Per-layer running sums; sparsity stays a device tensor until read (no sync per call)."""

    def __init__(self):
        self.sparse_calls = 0
        self.dense_calls = 0
        self.sparsity_sum = None
        self.recall_sum = 0.0
        self.recall_calls = 0
        self.min_recall = None

    def add_sparsity(self, kept):
        sparsity = 1.0 - kept.float().mean().detach()
        self.sparsity_sum = sparsity if self.sparsity_sum is None else self.sparsity_sum + sparsity
        self.sparse_calls += 1

    def add_recall(self, recall):
        self.recall_sum += float(recall.mean())
        self.recall_calls += 1
        low = float(recall.min())
        self.min_recall = low if self.min_recall is None else min(self.min_recall, low)

    def report(self) -> LayerStats:
        sparsity = None if self.sparsity_sum is None else float(self.sparsity_sum) / \
            self.sparse_calls
        recall = self.recall_sum / self.recall_calls if self.recall_calls else None
        return LayerStats(self.sparse_calls, self.dense_calls, sparsity, recall, self.min_recall)


class WanSparseAttention:
    """The controller :func:`apply_sparse_attention` returns: step counter, stats, removal.

    Attributes
    ----------
    step : int
        The current denoising step (0-based); steps ``< dense_steps`` run dense.
    dense_steps : int
        How many leading steps stay dense.
    processors : dict
        ``{layer name: SparseWanAttnProcessor}``.
    """

    def __init__(self, dense_steps, measure_recall):
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"dense_steps must be a non-negative int, got {dense_steps!r}")
        self.dense_steps = dense_steps
        self.measure_recall = bool(measure_recall)
        self.step = 0
        self.processors = {}
        self._restore = {}

    @property
    def dense_now(self) -> bool:
        """Whether the current step runs dense."""
        return self.step < self.dense_steps

    def advance(self, steps=1):
        """Move the step counter forward by ``steps``."""
        self.step += int(steps)

    def callback_on_step_end(self, pipeline, step_index, timestep, callback_kwargs):
        """A diffusers ``callback_on_step_end``: the next step is ``step_index + 1``."""
        self.step = int(step_index) + 1
        return callback_kwargs

    def reset(self):
        """Step counter to 0 and every layer's statistics cleared (call before a generation)."""
        self.step = 0
        for processor in self.processors.values():
            processor.accumulator = _Accumulator()

    def stats(self) -> dict:
        """``{layer name: LayerStats}`` since the last :meth:`reset` (reads device values)."""
        return {name: p.accumulator.report() for name, p in self.processors.items()}

    def remove(self):
        """Put back the processors that were replaced (SLA weights go with their processor)."""
        for name, (module, processor) in self._restore.items():
            module.set_processor(processor)
        self._restore.clear()
        self.processors.clear()


def _rotate(x, freqs_cos, freqs_sin):
    """Wan's rotary embedding on interleaved pairs of the head dim, in the promoted dtype."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def self_attention_qkv(attn, hidden_states, rotary_emb=None):
    """The query, key and value a ``WanAttention`` self-attention layer attends, (B, N, H, D).

    Wan's projections, RMS norms and rotary embedding, as diffusers' ``WanAttnProcessor``
    applies them; the layout is pysparse_attn's ``"bnhd"``.
    """
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = (attn.to_q(hidden_states), attn.to_k(hidden_states),
                             attn.to_v(hidden_states))
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    if rotary_emb is not None:
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
    return query, key, value


class SparseWanAttnProcessor(torch.nn.Module):
    """A ``WanAttention`` processor running self-attention through pysparse_attn.

    Same call signature as diffusers' ``WanAttnProcessor``. Cross-attention calls (an
    ``encoder_hidden_states`` is given, or the layer is a cross-attention layer) and calls
    during the controller's dense steps go to the stock processor unchanged. An nn.Module, as
    diffusers expects of processors with weights: with SLA its
    :class:`~pysparse_attn.torch.SparseLinearAttention` (``sparse_linear``) is part of the
    model's parameters and ``state_dict``.

    Parameters
    ----------
    controller : WanSparseAttention
        Step counter and statistics owner.
    stock : WanAttnProcessor
        The processor replaced (used for dense calls).
    head_dim : int
        The layer's head dimension.
    select, skip : selector and skip rule
        As in :func:`pysparse_attn.attention`.
    sla : dict, optional
        Keyword arguments of :class:`~pysparse_attn.torch.SparseLinearAttention`
        (``critical``, ``negligible``, ``linear``, ``feature_map``, ``eps``); enables SLA.
    **options
        Other keyword options of :func:`pysparse_attn.attention` (``block``, ``order``, ...).
    """

    def __init__(self, controller, stock, head_dim, *, select=None, skip=None, sla=None,
                 **options):
        super().__init__()
        self.controller = controller
        self.stock = stock
        self.accumulator = _Accumulator()
        self.block = tuple(options.get("block", (64, 64)))
        self.scale = options.get("scale")
        if sla is not None:
            if select is not None:
                raise ValueError("select: SLA makes its own critical/marginal split; give "
                                 "select or sla, not both")
            self.sparse_linear = psa_torch.SparseLinearAttention(
                head_dim, layout="bnhd", skip=skip, **dict(sla), **options)
            self.spec = None
            self.mask = None
        else:
            self.sparse_linear = None
            # Built once: a compiled model sees a constant string.
            self.spec = psa_torch.spec("attention", select, skip, **options)
            self.mask = select.mask if isinstance(select, BlockMask) else None

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                rotary_emb=None):
        """Same arguments and result as ``WanAttnProcessor.__call__``."""
        if (encoder_hidden_states is not None or attn.is_cross_attention
                or self.controller.dense_now):
            if encoder_hidden_states is None and not attn.is_cross_attention:
                self.accumulator.dense_calls += 1
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                              rotary_emb)
        if attention_mask is not None:
            raise ValueError("attention_mask: pysparse_attn's Wan processor does not take an "
                             "attention mask (Wan's self-attention passes none)")
        if getattr(self.stock, "_parallel_config", None) is not None:
            raise ValueError("context parallelism is not supported by pysparse_attn's Wan "
                             "processor")
        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb)
        out, stats = self._attend(query, key, value)
        self._record(query, key, stats.kept)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _attend(self, query, key, value):
        if self.sparse_linear is not None:
            return self.sparse_linear(query, key, value, return_stats=True)
        mask = None
        if self.mask is not None:
            mask = psa_torch._mask_tensor(self.mask, query.device)
        return psa_torch._attention(query, key, value, mask, self.spec, "bnhd", True)

    def _record(self, query, key, kept):
        self.accumulator.add_sparsity(kept)
        if self.controller.measure_recall:
            host = [x.detach().to(torch.float64).cpu().numpy() for x in (query, key)]
            recall = _api.recall(host[0], host[1], kept.cpu().numpy(), block=self.block,
                                 scale=self.scale, layout="bnhd")
            self.accumulator.add_recall(np.asarray(recall))


def apply_sparse_attention(model, *, select=None, skip=None, sla=None, dense_steps=0,
                           measure_recall=False, **options) -> WanSparseAttention:
    """Run the self-attention of a ``WanTransformer3DModel`` through pysparse_attn.

    Parameters
    ----------
    model : torch.nn.Module
        A ``WanTransformer3DModel`` (or any module holding ``WanAttention`` layers).
    select : None, BlockMask, TopK or TopP
        Selector of every self-attention layer.
    skip : None, Blasst, Cef or Recall
        Skip rule.
    sla : dict, optional
        Enable SLA with these :class:`~pysparse_attn.torch.SparseLinearAttention` arguments
        (``critical``, ``negligible``, ...); each layer gets its own zero-initialised,
        trainable ``W`` and ``b`` (``processor.sparse_linear``) on the layer's device.
    dense_steps : int
        Leading denoising steps that stay dense (stock processor).
    measure_recall : bool
        Also measure each call's exact recall (a float64 host computation of the full
        attention scores: for analysis at small sizes, not for production runs).
    **options
        Other keyword options of :func:`pysparse_attn.attention` (``block``, ``order``,
        ``peak``, ``scale``, ``backend``, ``threads``).

    Returns
    -------
    WanSparseAttention
        The controller: step counter, :meth:`~WanSparseAttention.stats`,
        :meth:`~WanSparseAttention.remove`.
    """
    controller = WanSparseAttention(dense_steps, measure_recall)
    for name, module in model.named_modules():
        if not isinstance(module, WanAttention) or module.is_cross_attention:
            continue
        stock = module.processor
        if isinstance(stock, SparseWanAttnProcessor):
            raise ValueError(f"{name} already runs pysparse_attn; remove() the previous "
                             "controller first")
        if not isinstance(stock, WanAttnProcessor):
            raise TypeError(f"{name} has processor {type(stock).__name__}; pysparse_attn "
                            "replaces diffusers' WanAttnProcessor only")
        processor = SparseWanAttnProcessor(controller, stock, module.inner_dim // module.heads,
                                           select=select, skip=skip, sla=sla, **options)
        parameter = next(module.parameters(), None)
        if parameter is not None:
            processor.to(parameter.device)
        module.set_processor(processor)
        controller.processors[name] = processor
        controller._restore[name] = (module, stock)
    if not controller.processors:
        raise ValueError("model has no Wan self-attention layer (WanAttention with "
                         "is_cross_attention=False)")
    return controller
