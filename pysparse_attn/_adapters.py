"""What the framework adapters (``pysparse_attn.torch``, ``pysparse_attn.jax``) share.

The adapters turn framework tensors into NumPy (host) or CuPy (GPU) arrays in the canonical
``(B, H, N, D)`` layout, call the core through the four ``call_*`` functions below, and wrap
the results back. Those four functions are the only places an adapter talks to the core, so a
change of the core's signatures is absorbed here once. They fix what the adapters promise their
framework's abstract (fake / shape) evaluation, whatever the backend returns:

* every output is a fresh C-contiguous array (``out`` in the input dtype, canonical layout);
* ``lse`` is float64 for float64 inputs and float32 otherwise (docs/design.rst section 2);
* ``kept`` and ``marginal`` are bool ``(B, H, nq, nk)``;
* ``dq``, ``dk``, ``dv`` have the dtype and shape of ``q``, ``k``, ``v``; ``dW``/``db`` are
  float64 for float64 inputs and float32 otherwise.

Non-array options (selector, skip rule, scalars) travel as an :class:`Options`: hashable, with
a canonical JSON form (:meth:`Options.spec`, :func:`decode`) for frameworks whose operators take
only strings and numbers (torch custom ops). A ``BlockMask`` is carried as the marker
``"mask"``; its array travels beside the options as an operator argument.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import _api
from ._rules import RULES, SkipRule
from ._select import BlockMask, TopK, TopP

__all__ = ["Options", "make_options", "decode", "call_attention", "call_attention_vjp",
           "call_sla", "call_sla_vjp", "MASK"]

#: ``Options.select`` for a BlockMask whose mask travels as an array argument.
MASK = "mask"

_SELECTORS = {cls.__name__: cls for cls in (TopK, TopP)}
_RULES = {cls.__name__: cls for cls in RULES}
# Handled by the adapters themselves, never forwarded to the core as keywords.
_ADAPTER_KEYWORDS = {"layout", "return_stats"}
# Arrays of an SLA call: operator arguments, not options.
_ARRAY_KEYWORDS = {"proj_weight", "proj_bias"}


@functools.lru_cache(maxsize=None)
def _core_keywords(function):
    """Keyword-only parameters of a core function and their defaults."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


_FORWARD = {"attention": _api.attention, "sla": _api.sla_attention}
# Looked up once, here: make_options must stay plain Python that torch.compile can trace
# (no inspect, no json at call time), so that options built inside a compiled function are
# read with their traced values.
_KEYWORDS = {op: _core_keywords(function) for op, function in _FORWARD.items()}
_FIELD_NAMES = {cls: tuple(field.name for field in fields(cls))
                for cls in tuple(_SELECTORS.values()) + tuple(_RULES.values())}


def _plain(name, value):
    """``value`` if it is a JSON-exact scalar or a tuple of them, else a TypeError."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if '"' in value or "\\" in value:
            raise ValueError(f"{name}: option strings cannot hold quotes or backslashes")
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value}")
        return value
    if isinstance(value, np.ndarray):  # a per-head rule parameter
        return tuple(float(x) for x in value.tolist())
    if isinstance(value, (tuple, list)):
        return tuple(_plain(name, item) for item in value)
    raise TypeError(f"{name}: the adapters pass only numbers, strings, bools, None and tuples of "
                    f"them as options, got {type(value).__name__}")


def _fields_of(obj):
    """A selector's or rule's fields as sorted ``(name, plain value)`` pairs."""
    names = _FIELD_NAMES[type(obj)]
    return tuple(sorted((name, _plain(name, getattr(obj, name))) for name in names))


def _fields_with_arrays(obj):
    """:func:`_fields_of` for an object holding per-head arrays.

    The torch adapter evaluates this one eagerly while torch.compile traces (its tracer cannot
    read NumPy arrays into Python floats); everything else stays traceable.
    """
    return _fields_of(obj)


def _fields_of_any(obj):
    if any(isinstance(getattr(obj, name), np.ndarray) for name in _FIELD_NAMES[type(obj)]):
        return _fields_with_arrays(obj)
    return _fields_of(obj)


def _json(value):
    """The JSON text of a plain value (tuples as arrays), as ``json.dumps`` writes it."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value + '"'
    return "[" + ",".join([_json(item) for item in value]) + "]"


def _rebuild(registry, name, items):
    values = {key: (np.array(value, dtype=np.float64) if isinstance(value, (tuple, list))
                    else value) for key, value in items}
    return registry[name](**values)


@dataclass(frozen=True)
class Options:
    """The non-array options of one adapter call (hashable).

    Attributes
    ----------
    op : {"attention", "sla"}
        Which core function.
    select : tuple or None
        ``None`` (dense), ``MASK`` (a BlockMask given as an array argument) or
        ``(class name, fields)`` of a TopK/TopP.
    skip : tuple or None
        ``(class name, fields)`` of a skip rule, per-head parameters as tuples of floats.
    keywords : tuple
        Sorted ``(name, value)`` pairs of the other keyword options given (``scale``,
        ``block``, ``order``, ``critical`` ...), plain values only; those equal to the core's
        defaults are left out.
    """

    op: str
    select: Any
    skip: Any
    keywords: tuple

    def spec(self) -> str:
        """The canonical JSON text of these options (what a torch custom op receives)."""
        return ('{"keywords":' + _json(self.keywords) + ',"op":' + _json(self.op)
                + ',"select":' + _json(self.select) + ',"skip":' + _json(self.skip) + "}")

    @functools.cached_property
    def selector(self):
        """The selector object (``MASK`` stays a marker), rebuilt once."""
        if self.select is None or self.select == MASK:
            return self.select
        return _rebuild(_SELECTORS, *self.select)

    @functools.cached_property
    def rule(self):
        """The skip rule object, rebuilt once."""
        return None if self.skip is None else _rebuild(_RULES, *self.skip)

    def keyword(self, name):
        """A keyword option's value, or the core's default for it."""
        given = dict(self.keywords)
        return given[name] if name in given else _KEYWORDS[self.op][name]

    @property
    def block(self) -> tuple:
        """``(Bq, Bk)``."""
        return tuple(int(b) for b in self.keyword("block"))

    def core_keywords(self, function, **extra):
        """Keyword arguments for a core ``function``: those of these options it accepts."""
        accepted = _core_keywords(function)
        out = {name: value for name, value in self.keywords if name in accepted}
        if "block" in out:
            out["block"] = tuple(out["block"])
        if "skip" in accepted:
            out["skip"] = self.rule
        out.update(extra)
        return out


def make_options(op, *, select=None, skip=None, **keywords) -> Options:
    """Validate and encode the non-array options of an adapter call.

    ``keywords`` are the core function's keyword options except the selector, the rule, the
    arrays (``proj_weight``, ``proj_bias``) and the adapter's own (``layout``,
    ``return_stats``). A keyword the core does not take is a TypeError, as it would be there.
    Values are checked by the core at the first real call.
    """
    if op not in _KEYWORDS:
        raise ValueError(f"op must be one of {tuple(_KEYWORDS)}, got {op!r}")
    core = _KEYWORDS[op]
    excluded = _ADAPTER_KEYWORDS | _ARRAY_KEYWORDS | {"select", "skip"}
    for name in keywords:
        if name not in core or name in excluded:
            allowed = sorted(n for n in core if n not in excluded)
            raise TypeError(f"{name!r} is not an option of pysparse_attn."
                            f"{_FORWARD[op].__name__} the adapters can pass "
                            f"(accepted: {', '.join(allowed)})")
    if select is None:
        select_key = None
    elif isinstance(select, BlockMask):
        select_key = MASK
    elif isinstance(select, (TopK, TopP)):
        select_key = (type(select).__name__, _fields_of_any(select))
    else:
        raise TypeError(f"select must be None, BlockMask, TopK or TopP, got "
                        f"{type(select).__name__}")
    if skip is not None and not isinstance(skip, SkipRule):
        raise TypeError(f"skip must be None or a skip rule (Blasst, Cef, Recall), got "
                        f"{type(skip).__name__}")
    skip_key = None if skip is None else (type(skip).__name__, _fields_of_any(skip))
    plain = []
    for name in sorted(keywords):
        value = _plain(name, keywords[name])
        default = core[name]
        if value != default or type(value) is not type(default):
            plain.append((name, value))
    return Options(op, select_key, skip_key, tuple(plain))


@functools.lru_cache(maxsize=256)
def decode(spec: str) -> Options:
    """The :class:`Options` of a :meth:`Options.spec` text (cached)."""
    data = json.loads(spec)

    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return Options(data["op"], tuples(data["select"]), tuples(data["skip"]),
                   tuples(data["keywords"]))


def tile_counts(options: Options, n_queries: int, n_keys: int):
    """``(nq, nk)`` of a call (works on symbolic sizes: integer arithmetic only)."""
    bq, bk = options.block
    return (n_queries + bq - 1) // bq, (n_keys + bk - 1) // bk


def _xp(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def _fresh(x, dtype=None):
    """A C-contiguous copy-if-needed of ``x`` (in ``dtype`` if given)."""
    xp = _xp(x)
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    return xp.ascontiguousarray(x)


def stats_dtype(dtype):
    """LSE and dW/db dtype of inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _selector(options, mask):
    if options.selector == MASK:
        if mask is None:
            raise ValueError("select: a BlockMask selector needs its mask array")
        return BlockMask(mask)
    return options.selector


def call_attention(q, k, v, mask, options: Options):
    """Forward of :func:`pysparse_attn.attention` on canonical arrays: ``(out, lse, kept)``."""
    out, stats = _api.attention(q, k, v, select=_selector(options, mask), return_stats=True,
                                **options.core_keywords(_api.attention))
    return _fresh(out), _fresh(stats.lse, stats_dtype(q.dtype)), _fresh(stats.kept)


def call_attention_vjp(q, k, v, do, kept, mask, options: Options, out=None, lse=None):
    """``(dq, dk, dv)`` of :func:`call_attention` with its kept set replayed.

    ``out`` and ``lse`` are the forward's saved results (canonical layout); the core's vjp
    uses them instead of recomputing the forward's output and LSE.
    """
    grads = _api.attention_vjp(q, k, v, do, select=_selector(options, mask), kept=kept,
                               out=out, lse=lse, **options.core_keywords(_api.attention_vjp))
    return tuple(_fresh(g, x.dtype) for g, x in zip(grads, (q, k, v)))


def call_sla(q, k, v, weight, bias, options: Options):
    """Forward of :func:`pysparse_attn.sla_attention`: ``(out, lse, kept, marginal)``."""
    out, stats = _api.sla_attention(q, k, v, proj_weight=weight, proj_bias=bias,
                                    return_stats=True,
                                    **options.core_keywords(_api.sla_attention))
    return (_fresh(out), _fresh(stats.lse, stats_dtype(q.dtype)), _fresh(stats.kept),
            _fresh(stats.marginal))


def call_sla_vjp(q, k, v, do, kept, weight, bias, options: Options, out=None, lse=None,
                 marginal=None):
    """``(dq, dk, dv, dW, db)`` of :func:`call_sla` with its plan and kept set replayed.

    ``out`` (the merged output) and ``lse`` (the sparse branch's) are the forward's saved
    results: the core derives the sparse output from them instead of rerunning the sparse
    forward. With the forward's ``marginal`` tiles as well no plan is rebuilt.
    """
    dq, dk, dv, dw, db = _api.sla_vjp(q, k, v, do, proj_weight=weight, proj_bias=bias, kept=kept,
                                      out=out, lse=lse, marginal=marginal,
                                      **options.core_keywords(_api.sla_vjp))
    acc = stats_dtype(q.dtype)
    return (_fresh(dq, q.dtype), _fresh(dk, k.dtype), _fresh(dv, v.dtype), _fresh(dw, acc),
            _fresh(db, acc))
