"""Shared test configuration: hypothesis profiles and the ``gpu`` marker.

Hypothesis profiles
-------------------
``ci`` (the default) keeps the whole suite within a few minutes on two cores; ``thorough``
runs many more examples per property. Choose one with the environment variable
``HYPOTHESIS_PROFILE`` (``HYPOTHESIS_PROFILE=thorough make test``). Both disable the deadline:
the first call of a Numba-compiled reference loop compiles it, which says nothing about the
code under test.

GPU tests
---------
Tests marked ``@pytest.mark.gpu`` are skipped, with the reason, when CuPy cannot be imported or
no CUDA device is visible.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The helpers beside this file (strategies.py, attention_ref.py) are imported by plain name,
# whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=_SLOW_IS_FINE, print_blob=True
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=_SLOW_IS_FINE,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _gpu_unavailable_reason():
    """Why GPU tests cannot run here, or ``None`` when CuPy sees a CUDA device."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a CUDA library that fails to load
        return f"CuPy is not importable ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return f"CuPy sees no CUDA runtime ({type(error).__name__}: {error})"
    if count < 1:
        return "CuPy is installed but no CUDA device is visible"
    return None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU and CuPy (skipped with a reason otherwise)"
    )


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_unavailable_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=f"GPU test: {reason}")
    for item in gpu_items:
        item.add_marker(marker)
