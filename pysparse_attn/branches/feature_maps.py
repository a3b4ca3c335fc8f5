"""The SLA feature maps phi, applied along the head dimension, and their vector-Jacobian products.

``softmax`` (the default, SLA's choice), ``elu1`` (elu + 1) and ``relu``. The names in
:data:`FEATURE_MAPS` are the ones every backend accepts (the C++ backend maps them to integer
codes in ``cpu/_cpu.pyx``; the CUDA backend to template instances of ``gpu/linear_branch.cu``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["FEATURE_MAPS", "check_feature_map", "feature_map", "feature_map_vjp"]

FEATURE_MAPS = ("softmax", "elu1", "relu")


def check_feature_map(name):
    """``name`` itself when it names a feature map, else ``ValueError`` naming ``feature_map``."""
    if not isinstance(name, str) or name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")
    return name


def feature_map(x, name, xp=np):
    """phi(x) along the last axis, in the dtype of ``x``.

    Parameters
    ----------
    x : array ``(..., D)``
        Floating array of namespace ``xp``.
    name : {"softmax", "elu1", "relu"}
    xp : module
        The array namespace of ``x`` (NumPy or CuPy).
    """
    check_feature_map(name)
    if name == "softmax":
        e = xp.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if name == "elu1":
        return xp.where(x > 0, x + 1, xp.exp(xp.minimum(x, 0)))
    return xp.maximum(x, 0)


def feature_map_vjp(x, phi, name, d_phi, xp=np):
    """``(d phi / d x)^T d_phi`` along the last axis, given ``x`` and ``phi = phi(x)``.

    relu's derivative at 0 is taken as 0 (the subgradient the C++ backend uses too).
    """
    check_feature_map(name)
    if name == "softmax":
        return phi * (d_phi - (d_phi * phi).sum(axis=-1, keepdims=True))
    if name == "elu1":
        return d_phi * xp.where(x > 0, 1, phi)
    return d_phi * (x > 0)
