"""Arrays in, arrays out: namespaces, devices, dtypes, layouts and argument checks.

Every error of docs/design.rst section 10 that concerns an array is raised here, naming the argument.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Canonical", "canonicalize", "check_scale", "check_block", "float_dtype_name"]

LAYOUTS = ("bhnd", "bnhd")
_DLPACK_CUDA = 2  # kDLCUDA in the DLPack device enum
_FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")


_DTYPE_NAMES = {}  # dtype -> float_dtype_name (numpy's dtype.name is a Python-level property)


def float_dtype_name(dtype) -> str:
    """``'float64'``, ``'float32'``, ``'float16'`` or ``'bfloat16'``, else ``''``."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        pass
    name = getattr(dtype, "name", str(dtype))
    name = name if name in _FLOAT_NAMES else ""
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:  # an unhashable dtype-like
        pass
    return name


def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def on_cuda(x) -> bool:
    """Whether ``x`` lives in CUDA device memory (CuPy, or a DLPack producer on a GPU)."""
    if isinstance(x, np.ndarray):
        return False
    if _is_cupy(x) or hasattr(x, "__cuda_array_interface__"):
        return True
    device = getattr(x, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        return int(device()[0]) == _DLPACK_CUDA
    except Exception:  # a producer whose device query fails is treated as host memory
        return False


def caller_stream(x):
    """The context a call on ``x`` runs in: the caller's CUDA stream where its framework has one.

    For a torch CUDA tensor, that tensor's device and torch's current stream on it (wrapped as
    a CuPy ``ExternalStream``), so the kernels queue behind the caller's own work. Otherwise
    nothing changes: CuPy arrays already run on CuPy's current stream, and other DLPack
    producers (JAX) order their buffers through the DLPack exchange.
    """
    if type(x).__module__.split(".")[0] == "torch" and getattr(x, "is_cuda", False):
        try:
            import cupy
        except ImportError:  # the backend's own check reports the missing CuPy
            return contextlib.nullcontext()
        import torch

        context = contextlib.ExitStack()
        context.enter_context(cupy.cuda.Device(x.device.index))
        stream = torch.cuda.current_stream(x.device)
        context.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, x.device.index))
        return context
    return contextlib.nullcontext()


def on_caller_stream(function):
    """Run ``function(q, ...)`` in :func:`caller_stream` of its first argument."""
    @functools.wraps(function)
    def wrapper(q, *args, **kwargs):
        with caller_stream(q):
            return function(q, *args, **kwargs)
    return wrapper


def namespace_of(x) -> str:
    """The array library ``x`` comes from: the top-level module of its type (``"jax"`` for
    jaxlib's array type)."""
    module = type(x).__module__.split(".")[0]
    return "jax" if module == "jaxlib" else module


def _caller_namespace(x):
    """A function that brings a NumPy/CuPy result back into ``x``'s namespace."""
    if isinstance(x, np.ndarray) or _is_cupy(x):
        return lambda y: y
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    module = type(x).__module__.split(".")[0]

    def give(y):
        if isinstance(y, np.ndarray) and str(y.dtype) == "bfloat16":
            # NumPy cannot export bfloat16 through DLPack: hand over the 16-bit buffer.
            if module == "torch":
                import torch

                return torch.from_dlpack(y.view(np.int16)).view(torch.bfloat16)
            if module in ("jax", "jaxlib"):
                import jax.numpy as jnp

                return jnp.asarray(y)
        return xp.from_dlpack(y)
    return give


def _host_bfloat16_view(x):
    """A host bfloat16 torch or JAX array as a NumPy ``ml_dtypes.bfloat16`` view (no copy), or
    None for anything else.

    NumPy's DLPack import refuses bfloat16, so the producer's buffer is taken as 16-bit
    integers (torch: ``view(torch.int16)``; JAX: its buffer protocol) and re-labelled.
    """
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        import torch

        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return None
        import ml_dtypes

        return np.from_dlpack(x.detach().view(torch.int16)).view(ml_dtypes.bfloat16)
    if module in ("jax", "jaxlib"):
        if str(getattr(x, "dtype", "")) != "bfloat16" or on_cuda(x):
            return None
        view = np.asarray(x)  # JAX exports host buffers with their ml_dtypes dtype, zero-copy
        return view if str(view.dtype) == "bfloat16" else None
    return None


def _to_backend_array(name, x, on_gpu):
    """``x`` as a NumPy (host) or CuPy (GPU) array, zero-copy where the producer allows."""
    if on_gpu:
        import cupy

        return x if _is_cupy(x) else cupy.from_dlpack(x)
    if isinstance(x, np.ndarray):
        return x
    if not hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        raise TypeError(f"{name} must be an array (NumPy, CuPy or a DLPack producer), "
                        f"got {type(x).__name__}")
    bf16 = _host_bfloat16_view(x)
    if bf16 is not None:
        return bf16
    try:
        return np.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError, AttributeError) as error:
        if hasattr(x, "__array__") and not hasattr(x, "__dlpack__"):
            return np.asarray(x)
        raise TypeError(f"{name}: cannot view this {type(x).__name__} as a NumPy array through "
                        f"DLPack ({error}); host bfloat16 tensors of other frameworks need a "
                        "NumPy array with ml_dtypes.bfloat16") from error


def check_array(name, x):
    """A ``TypeError`` naming ``name`` unless ``x`` is an array this library reads: NumPy, or any
    object exporting DLPack or the CUDA array interface."""
    if not (isinstance(x, np.ndarray) or hasattr(x, "__dlpack__")
            or hasattr(x, "__cuda_array_interface__")):
        raise TypeError(f"{name} must be an array (NumPy, CuPy or a DLPack producer), "
                        f"got {type(x).__name__}")


def as_backend_array(name, x, on_gpu):
    """Any array-like as a NumPy (host) or CuPy (GPU) array, moving it between devices if needed.

    For auxiliary inputs (masks, kept sets, projection weights); never changes the dtype.
    """
    if on_cuda(x):
        x = _to_backend_array(name, x, True)
        return x if on_gpu else x.get()
    if isinstance(x, (list, tuple, bool, int, float)):
        x = np.asarray(x)
    x = _to_backend_array(name, x, False)
    if on_gpu:
        import cupy

        return cupy.asarray(x)
    return x


def check_tile_mask(name, mask, shape, on_gpu, nonempty=False):
    """A bool tile mask broadcast to ``shape = (B, H, nq, nk)``, on the backend's device.

    ``nonempty``: every query tile must keep at least one key tile.
    """
    mask = as_backend_array(name, mask, on_gpu)
    if mask.dtype != bool:
        raise TypeError(f"{name} must be a bool array, got dtype {mask.dtype}")
    if on_gpu:
        import cupy as xp
    else:
        xp = np
    try:
        mask = xp.broadcast_to(mask, tuple(shape))
    except ValueError as error:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to "
                         f"(B, H, nq, nk) = {tuple(shape)}") from error
    if nonempty and not bool(mask.any(axis=-1).all()):
        raise ValueError(f"{name} must keep at least one key tile in every query tile")
    return mask


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` when ``None``, else a positive finite float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return scale


def check_block(block) -> tuple[int, int]:
    """``(Bq, Bk)`` as two positive ints."""
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise TypeError(f"block must be a pair (Bq, Bk) of ints, got {block!r}")
    for item in block:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"block must be a pair (Bq, Bk) of ints, got {block!r}")
        if item < 1:
            raise ValueError(f"block sizes must be >= 1, got {block!r}")
    return int(block[0]), int(block[1])


@dataclass
class Canonical:
    """q, k, v as ``(B, H, N, D)`` views in the backend namespace, and how to give results back."""

    q: Any
    k: Any
    v: Any
    xp: Any
    on_gpu: bool
    layout: str
    dtype_name: str
    to_caller: Callable
    inputs_on_gpu: bool = False
    input_dtype_name: str = ""  # the caller's dtype when a precision option converted q, k, v
    namespace: str = ""  # namespace_of(q), for the arrays that must match it (saved tensors)

    def like_q(self, name, x):
        """Validate an array shaped like ``q`` (a cotangent) and give its canonical view."""
        check_array(name, x)
        if on_cuda(x) != self.inputs_on_gpu:
            raise ValueError(f"{name} must live on the device of q")
        x = as_backend_array(name, x, self.on_gpu)
        _check_rank_and_dtype(name, x, self.layout, self.input_dtype_name or self.dtype_name)
        if x.dtype != self.q.dtype:
            x = x.astype(self.q.dtype)
        if self.layout == "bnhd":
            x = self.xp.swapaxes(x, 1, 2)
        if tuple(x.shape) != tuple(self.q.shape):
            raise ValueError(f"{name} must have the shape of q, got {tuple(x.shape)}")
        if not self.on_gpu:  # on the GPU the check would read a flag back to the host
            _check_finite(self.xp, name, x)
        return x

    def from_canonical(self, x):
        """A per-row result ``(B, H, N)`` or ``(B, H, N, D)`` in the caller's layout, namespace."""
        if self.layout == "bnhd":
            x = self.xp.swapaxes(x, 1, 2)
        return self.to_caller(x)


def _check_rank_and_dtype(name, x, layout, expected=""):
    """The dtype name of a 4-D floating array, equal to ``expected`` when one is given."""
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D ({layout.upper()}), got shape {tuple(x.shape)}")
    this = float_dtype_name(x.dtype)
    if not this:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if expected and this != expected:
        raise TypeError(f"{name} has dtype {this} but q has {expected}; q, k, v (and do) must "
                        "share one dtype (nothing is cast implicitly)")
    return this


def _check_finite(xp, name, x):
    # One reduction first (cheap); the elementwise test only to rule out a false alarm from
    # an overflowing sum of large finite values.
    with np.errstate(over="ignore", invalid="ignore"):
        total = xp.sum(x, dtype=xp.float64) if x.dtype != xp.float64 else xp.sum(x)
    if not bool(xp.isfinite(total)) and not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or infinity")


def _check_all_finite(xp, arrays: dict, on_gpu: bool):
    """Reject NaN/inf in any of ``arrays``. On the GPU the sums stay on the device and one
    flag is read back (one synchronisation for the whole call); the input is named after."""
    if not on_gpu:
        for name, x in arrays.items():
            _check_finite(xp, name, x)
        return
    totals = xp.stack([xp.sum(x, dtype=xp.float64) for x in arrays.values()])
    if bool(xp.isfinite(totals.sum())):
        return
    for name, x in arrays.items():
        _check_finite(xp, name, x)


def canonicalize(arrays: dict, *, layout: str, device: str = "auto",
                 check_finite=True) -> Canonical:
    """Validate ``{'q': q, 'k': k, 'v': v}`` and bring them to canonical form.

    ``device`` is ``'auto'`` (follow the inputs), ``'host'`` or ``'gpu'``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = list(arrays)
    for name, x in arrays.items():
        check_array(name, x)
    first = arrays[names[0]]
    kinds = {name: ("gpu" if on_cuda(x) else "host") for name, x in arrays.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError("q, k and v must live on the same device, got "
                         + ", ".join(f"{n} on {d}" for n, d in kinds.items()))
    types = {name: type(x) for name, x in arrays.items()}
    if len(set(types.values())) > 1:
        raise TypeError("q, k and v must come from the same array namespace, got "
                        + ", ".join(f"{n}: {t.__module__}.{t.__name__}" for n, t in types.items()))
    inputs_on_gpu = kinds[names[0]] == "gpu"
    on_gpu = inputs_on_gpu if device == "auto" else device == "gpu"
    to_caller = _caller_namespace(first)

    converted = {name: as_backend_array(name, x, on_gpu) for name, x in arrays.items()}
    if on_gpu:
        import cupy as xp
    else:
        xp = np
    if on_gpu != inputs_on_gpu:
        # An explicit backend on the other side: results travel back to the inputs' device.
        to_caller_inner = to_caller
        if inputs_on_gpu:
            import cupy

            to_caller = lambda y: to_caller_inner(cupy.asarray(y))  # noqa: E731
        else:
            to_caller = lambda y: to_caller_inner(y.get())  # noqa: E731

    dtype_name = ""
    for name, x in converted.items():
        dtype_name = _check_rank_and_dtype(name, x, layout, dtype_name)

    if layout == "bnhd":
        converted = {n: xp.swapaxes(x, 1, 2) for n, x in converted.items()}
    q, k, v = converted["q"], converted["k"], converted["v"]
    B, Hq, Nq, D = q.shape
    if min(q.shape) == 0:
        raise ValueError(f"q must be non-empty, got shape {tuple(q.shape)} (B, H, N, D)")
    if min(k.shape) == 0:
        raise ValueError(f"k must be non-empty, got shape {tuple(k.shape)} (B, H, N, D)")
    if k.shape[0] != B:
        raise ValueError(f"k has batch {k.shape[0]} but q has {B}")
    if k.shape[3] != D:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {D}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k (B, H, N, D) = {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"k has {k.shape[1]} heads, which does not divide the {Hq} heads of q "
                         "(grouped-query attention needs a multiple)")
    if check_finite:
        _check_all_finite(xp, converted, on_gpu)
    return Canonical(q=q, k=k, v=v, xp=xp, on_gpu=on_gpu, layout=layout,
                     dtype_name=dtype_name, to_caller=to_caller, inputs_on_gpu=inputs_on_gpu,
                     namespace=namespace_of(first))
