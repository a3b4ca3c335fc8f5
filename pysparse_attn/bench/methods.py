"""The methods a sweep compares: one name, one swept parameter, one call into the public API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._api import attention, sla_attention
from .._rules import Blasst, Cef, Recall
from .._select import TopK, TopP

__all__ = ["Method", "METHODS", "DEFAULT_METHODS"]


@dataclass(frozen=True)
class Method:
    """A sparse-attention method swept over one parameter.

    Attributes
    ----------
    name : str
        Identifier used on the command line and in results.
    parameter : str
        Name of the swept setting.
    values : tuple of float
        Default settings, from least to most aggressive where that is defined.
    call : callable
        ``call(q, k, v, value, block, backend, context) -> (out, stats)``; ``context`` is the
        :class:`~pysparse_attn.bench.sweep.Workload` (SLA with a fitted projection fits on its
        tensors and caches the fit).
    description : str
        One line for tables and plots.
    """

    name: str
    parameter: str
    values: tuple
    call: Callable
    description: str


def _rule_call(make_rule, order):
    def call(q, k, v, value, block, backend, context):
        return attention(q, k, v, skip=make_rule(value, q.shape[2], block), order=order,
                         block=block, backend=backend, return_stats=True)
    return call


def _select_call(make_selector):
    def call(q, k, v, value, block, backend, context):
        return attention(q, k, v, select=make_selector(value), block=block, backend=backend,
                         return_stats=True)
    return call


def _sla_call(q, k, v, value, block, backend, context):
    return sla_attention(q, k, v, critical=value, negligible=0.0, block=block, backend=backend,
                         return_stats=True)


def _host_f64(x):
    return np.asarray(x.get() if hasattr(x, "get") else x, dtype=np.float64)


def fit_sla_projection(q, k, v, reference, critical, block, backend, negligible=0.0,
                       rows=None):
    """Least-squares ``W``, ``b`` of SLA's output projection on ``(q, k, v)``.

    SLA learns ``W`` by fine-tuning the model; here it is fitted to make sparse + linear match
    ``reference`` (dense attention of the same tensors) in least squares, shared by all heads.
    The linear branch is read through the public API: ``O_l = O(W=I) - O(W=0)``. With
    ``rows`` (query-row indices), ``reference`` holds those rows only and the fit uses them.
    Returns float32 NumPy arrays (host).
    """
    D = q.shape[-1]
    identity = np.eye(D, dtype=np.float32)
    if hasattr(q, "get"):  # GPU inputs: the projection goes to the device too
        import cupy

        identity = cupy.asarray(identity)
    split = dict(critical=critical, negligible=negligible, block=block, backend=backend)
    sparse = _host_f64(sla_attention(q, k, v, **split))
    with_linear = _host_f64(sla_attention(q, k, v, proj_weight=identity, **split))
    if rows is not None:
        sparse, with_linear = sparse[:, :, rows], with_linear[:, :, rows]
    features = (with_linear - sparse).reshape(-1, D)
    residual = (_host_f64(reference) - sparse).reshape(-1, D)
    design = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
    # A small ridge keeps the solve defined when a feature column is (near) zero.
    gram = design.T @ design + 1e-6 * np.eye(D + 1)
    solution = np.linalg.solve(gram, design.T @ residual)
    return solution[:D].T.astype(np.float32), solution[D].astype(np.float32)


def _sla_fit_call(q, k, v, value, block, backend, context):
    # Fitted once per setting and cached on the workload, so timings cover the SLA call only.
    cache_key = ("sla-fit", value, tuple(block), backend)
    if cache_key not in context.cache:
        fit_q, fit_k, fit_v, reference = context.fit_tensors(backend)
        weight, bias = fit_sla_projection(fit_q, fit_k, fit_v, reference.out, value, block,
                                          backend, rows=reference.rows)
        if hasattr(q, "get"):
            import cupy

            weight, bias = cupy.asarray(weight), cupy.asarray(bias)
        context.cache[cache_key] = weight, bias
    weight, bias = context.cache[cache_key]
    return sla_attention(q, k, v, critical=value, negligible=0.0, block=block, backend=backend,
                         proj_weight=weight, proj_bias=bias, return_stats=True)


# Grids run from (nearly) exact to aggressive and go past where each method breaks down at
# 5% error on the bundled workloads, so matched-error tables are not clipped by the grid.
_LAMS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
_CEF_LAMS = tuple(float(x) for x in range(-14, 1))
_RECALLS = (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02)
_MASSES = (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3)
_CRITICAL = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


def _blasst(value, n_keys, block):
    return Blasst(value)


def _cef(value, n_keys, block):
    return Cef(value)


def _recall(value, n_keys, block):
    return Recall(value)


def _recall_exact(value, n_keys, block):
    return Recall(value, exact=True)


METHODS = {m.name: m for m in [
    Method("blasst", "lam", _LAMS, _rule_call(_blasst, "natural"),
           "Blasst(lam), natural order (published BLASST)"),
    Method("blasst-peak", "lam", _LAMS, _rule_call(_blasst, "peak"),
           "Blasst(lam), peak order (library default)"),
    Method("cef", "lam", _CEF_LAMS, _rule_call(_cef, "natural"),
           "Cef(lam), natural order (published CEF)"),
    Method("cef-peak", "lam", _CEF_LAMS, _rule_call(_cef, "peak"),
           "Cef(lam), peak order"),
    Method("recall-natural", "target", _RECALLS, _rule_call(_recall, "natural"),
           "Recall(R), natural order"),
    Method("recall-score", "target", _RECALLS, _rule_call(_recall, "score"),
           "Recall(R), score order"),
    Method("recall-peak", "target", _RECALLS, _rule_call(_recall, "peak"),
           "Recall(R), peak order (library default)"),
    Method("recall-exact", "target", _RECALLS, _rule_call(_recall_exact, "peak"),
           "Recall(R, exact=True), peak order"),
    Method("topk", "ratio", _RATIOS, _select_call(lambda r: TopK(ratio=r)),
           "TopK(ratio=r) plan alone"),
    Method("topp", "p", _MASSES, _select_call(lambda p: TopP(p)),
           "TopP(p) plan alone (pooled estimate)"),
    Method("sla", "critical", _CRITICAL, _sla_call,
           "SLA, W = 0 (untrained: sparse part only), negligible = 0"),
    Method("sla-fit", "critical", _CRITICAL, _sla_fit_call,
           "SLA, W and b least-squares fitted in-sample (optimistic), negligible = 0"),
]}

DEFAULT_METHODS = tuple(METHODS)
