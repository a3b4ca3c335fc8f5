"""Backend registry: ``reference`` (float64 oracle), ``cpu`` (C++/OpenMP), ``cupy`` (CUDA).

Each backend is a module with the functions of the backend contract (``docs/internals.rst``):
``forward``, ``linear_branch``, ``attention_backward``, ``linear_backward``, ``available``,
``supported_blocks`` (``None`` for any) and optionally ``build_plan``.
"""

from __future__ import annotations

import importlib

NAMES = ("reference", "cpu", "cupy")
_GPU = ("cupy",)
_AVAILABLE = {}


def load(name: str):
    """The backend module ``name``; ``ValueError`` when unknown or unavailable here.

    A backend found available is remembered for the process (the per-call cost of a GPU call
    is then a dictionary look-up, not a device query).
    """
    if name not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")
    module = _AVAILABLE.get(name)
    if module is not None:
        return module
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as error:
        raise ValueError(f"backend {name!r} is not available: {error}") from error
    reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    if reason is None and not module.available():
        reason = "not available on this machine"
    if reason:
        raise ValueError(f"backend {name!r} is not available: {reason}")
    _AVAILABLE[name] = module
    return module


def is_gpu(name: str) -> bool:
    return name in _GPU


def resolve(name: str, inputs_on_gpu: bool) -> str:
    """The backend that ``name`` (possibly ``'auto'``) means for inputs on the host or a GPU."""
    if name != "auto":
        if name not in NAMES:
            raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")
        return name
    if inputs_on_gpu:
        return "cupy"
    if "cpu" in _AVAILABLE:
        return "cpu"
    try:
        module = importlib.import_module(f"{__name__}.cpu")
        if module.available():
            return "cpu"
    except ImportError:
        pass
    return "reference"


def add_gradients(grads, addend):
    """``grads + addend`` term by term in the dtype of ``grads`` (``addend`` None: ``grads``).

    The host backends' form of a backward's ``addend`` (another branch's gradients, SLA's
    linear side); the GPU backend adds it inside its kernels' stores instead. ``grads`` are
    the backend's own fresh arrays and take the sum in place (a new array a term cost the CPU
    backend's SLA backward 5 of its 50 ms at (1, 4, 3072, 64), in first-touch page faults).
    """
    if addend is None:
        return tuple(grads)
    for g, a in zip(grads, addend):
        g += a.astype(g.dtype, copy=False)
    return tuple(grads)
