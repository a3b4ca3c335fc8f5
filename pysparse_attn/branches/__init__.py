"""Branches that SLA adds beside the sparse kernel: the linear branch and its feature maps.

Each function here is the one definition of a piece of the math, written against the array API
shared by NumPy and CuPy; a backend may provide a faster implementation of the same function
through a hook (``docs/internals.rst``), which this package calls when present.
"""

from .feature_maps import FEATURE_MAPS, check_feature_map, feature_map, feature_map_vjp

__all__ = ["FEATURE_MAPS", "check_feature_map", "feature_map", "feature_map_vjp"]
