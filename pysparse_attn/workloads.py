"""Video-like attention workloads: synthetic q, k, v on a T x H x W token grid, and user tensors.

The synthetic generator builds heads whose attention has a known structure, through the
mechanism real video diffusion transformers use: a content vector rotated by 3D rotary
position embeddings (RoPE) over (frame, row, column). With the same content vector ``u`` in
queries and keys, the logit between tokens ``i`` and ``j`` is a sum of cosines of the position
differences, ``sum_f |u_f|^2 cos(theta_f (p_i - p_j))``, a kernel that peaks at ``p_i = p_j``
and whose width is set by how ``u``'s energy is spread over frequencies. Giving energy to all
three axes makes a *local* head; giving none to the frame axis makes a *temporal* head (the
same spatial neighbourhood in every frame). *Global* heads add a position-independent
direction shared by every query and a few sink keys; *diffuse* heads have small random logits.

Tokens are flattened frame-major, then row, then column (``n = (t * H + y) * W + x``), the
order of Wan and HunyuanVideo, so a key tile of 64 tokens is about one image row.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = [
    "HEAD_KINDS",
    "ModelShape",
    "SHAPES",
    "video_qkv",
    "grid_positions",
    "rope_frequencies",
    "load_qkv",
]

HEAD_KINDS = ("local", "temporal", "global", "diffuse")

_ROPE_BASE = 10000.0
# Logit scale of the structured part of each head kind, in natural-log units above the
# background, at sharpness 1. Chosen so that at the Wan2.1 shape a local head keeps most of its
# mass within a few tokens, a global head puts most of its mass on its sinks (10 nats over
# ~3e4 background keys), and a diffuse head stays within a few percent of uniform.
_AXIS_PEAK = {"local": (4.0, 6.0, 6.0), "temporal": (0.0, 7.0, 7.0)}
_SINK_GAP = 10.0
_SINK_COUNT_MAX = 8
_DIFFUSE_LOGIT_STD = 0.3
# Energy decay across RoPE frequency pairs of one axis: most energy sits in the highest
# frequencies, which is what makes the kernel narrow (a few positions wide).
_FREQUENCY_DECAY = 0.75
# Standard deviation of the content noise in q and k, relative to one unit per channel.
_CONTENT_NOISE = 0.3


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of one video model at one resolution.

    Attributes
    ----------
    grid : tuple of int
        Latent token grid ``(T, H, W)`` after patchification.
    heads : int
        Attention heads per layer.
    head_dim : int
        Channels per head ``D``.
    note : str
        Where the numbers come from.
    """

    grid: tuple
    heads: int
    head_dim: int
    note: str = ""

    @property
    def tokens(self) -> int:
        """Sequence length ``N = T * H * W``."""
        return int(np.prod(self.grid))


SHAPES = {
    "wan2.1-1.3b-480p": ModelShape(
        (21, 30, 52), 12, 128,
        "Wan2.1-T2V-1.3B, 832x480, 81 frames: VAE 4x8x8, patch 1x2x2; dim 1536 / 12 heads."),
    "wan2.1-14b-720p": ModelShape(
        (21, 45, 80), 40, 128,
        "Wan2.1-T2V-14B, 1280x720, 81 frames: dim 5120 / 40 heads."),
    "wan2.2-a14b-720p": ModelShape(
        (21, 45, 80), 40, 128,
        "Wan2.2-A14B, 1280x720, 81 frames: same DiT geometry as Wan2.1-14B (dim 5120 / 40 heads)."),
    "hunyuanvideo-720p": ModelShape(
        (33, 45, 80), 24, 128,
        "HunyuanVideo, 1280x720, 129 frames: VAE 4x8x8, patch 1x2x2; dim 3072 / 24 heads. "
        "Approximate: the model's joint attention also holds ~256 text tokens, not modelled."),
}


def _check_grid(shape) -> tuple:
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"shape must be a (T, H, W) tuple or one of {sorted(SHAPES)}, "
                             f"got {shape!r}")
        return SHAPES[shape].grid
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
        raise TypeError(f"shape must be a (T, H, W) tuple of ints or a name in SHAPES, "
                        f"got {shape!r}")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise TypeError(f"shape must be a (T, H, W) tuple of ints, got {shape!r}")
        if size < 1:
            raise ValueError(f"shape sizes must be >= 1, got {shape!r}")
    return tuple(int(s) for s in shape)


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_dtype(dtype):
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        if isinstance(dtype, str) and dtype == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}") from error
    if resolved.kind != "f" and resolved.name != "bfloat16":
        raise TypeError(f"dtype must be float64, float32, float16 or bfloat16, got {resolved}")
    return resolved


def _check_kinds(kinds) -> tuple:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds must name at least one head kind")
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise ValueError(f"kinds must be drawn from {HEAD_KINDS}, got {kind!r}")
    return kinds


def grid_positions(grid) -> np.ndarray:
    """Integer ``(t, y, x)`` of every token, frame-major raster order.

    Parameters
    ----------
    grid : (int, int, int)
        ``(T, H, W)``.

    Returns
    -------
    positions : int64 array ``(T*H*W, 3)``

    Examples
    --------
    >>> from pysparse_attn.workloads import grid_positions
    >>> grid_positions((2, 2, 3))[4]
    array([0, 1, 1])
    """
    T, H, W = _check_grid(grid)
    t, y, x = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    return np.stack([t.ravel(), y.ravel(), x.ravel()], axis=1)


def _axis_pair_counts(head_dim: int) -> tuple:
    """RoPE pairs per axis (frame, row, column), split as in Wan: ``D - 4(D//6)``, ``2(D//6)``."""
    spatial = head_dim // 6
    return ((head_dim - 4 * spatial) // 2, spatial, spatial)


def rope_frequencies(head_dim: int, base: float = _ROPE_BASE) -> tuple:
    """Angular frequencies of the 3D RoPE pairs of each axis.

    The head dimension is split over (frame, row, column) as in Wan: ``D - 4 (D // 6)``
    channels for frames and ``2 (D // 6)`` for each spatial axis; within an axis of ``2 P``
    channels, pair ``f`` turns at ``base ** (-2 f / (2 P))`` radians per position.

    Parameters
    ----------
    head_dim : int
        Even, at least 6.
    base : float
        RoPE base (10000 in Wan and HunyuanVideo).

    Returns
    -------
    frequencies : tuple of three float64 arrays
        One per axis, highest frequency first.
    """
    head_dim = _positive_int("head_dim", head_dim)
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for 3D RoPE, got {head_dim}")
    return tuple(base ** (-np.arange(p) / p) for p in _axis_pair_counts(head_dim))


def _rope_angles(positions: np.ndarray, frequencies) -> np.ndarray:
    """Rotation angle of every token and pair, ``(N, D/2)``, axes concatenated."""
    return np.concatenate([positions[:, a, None] * frequencies[a][None, :]
                           for a in range(3)], axis=1)


def _rotate(x: np.ndarray, rotation) -> np.ndarray:
    """Rotate consecutive channel pairs of ``x (N, D)`` by ``(cos, sin)`` of ``(N, D/2)`` angles."""
    cos, sin = rotation
    even, odd = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = even * cos - odd * sin
    out[:, 1::2] = even * sin + odd * cos
    return out


def _positional_content(kind, frequencies, scale_to_logits, sharpness, rng):
    """Content vector ``u (D,)`` whose RoPE kernel gives ``kind``'s locality.

    Pair energies decay geometrically from the highest frequency; each axis's energies sum to
    its peak logit (over ``scale_to_logits``), so ``sum_f e_f`` is the kernel height at zero
    distance in nats.
    """
    energies = []
    for axis, peak in enumerate(_AXIS_PEAK[kind]):
        weights = _FREQUENCY_DECAY ** np.arange(frequencies[axis].size)
        energies.append(sharpness * peak * weights / weights.sum())
    energy = np.concatenate(energies) / scale_to_logits
    phase = rng.uniform(0.0, 2.0 * np.pi, size=energy.size)
    u = np.empty(2 * energy.size)
    u[0::2] = np.sqrt(energy) * np.cos(phase)
    u[1::2] = np.sqrt(energy) * np.sin(phase)
    return u


def _normal(rng, shape, work):
    return rng.standard_normal(shape, dtype=work)


def _head(kind, rotation, n_tokens, head_dim, scale, sharpness, rng, rope, frequencies):
    """q, k of one head (``(N, D)`` in the working dtype), following the module docstring."""
    work = rotation[0].dtype
    noise_q = _CONTENT_NOISE * _normal(rng, (n_tokens, head_dim), work)
    noise_k = _CONTENT_NOISE * _normal(rng, (n_tokens, head_dim), work)
    if kind in _AXIS_PEAK:
        u = _positional_content(kind, frequencies, scale, sharpness, rng).astype(work)
        if rope:
            q = _rotate(u[None, :] + noise_q, rotation)
            k = _rotate(u[None, :] + noise_k, rotation)
        else:
            # Absolute Fourier features give the same cosine kernel without rotating content.
            positional = _rotate(np.broadcast_to(u, (n_tokens, head_dim)), rotation)
            q, k = positional + noise_q, positional + noise_k
        return q, k
    if kind == "global":
        if rope:
            noise_q, noise_k = _rotate(noise_q, rotation), _rotate(noise_k, rotation)
        direction = rng.standard_normal(head_dim)
        direction = (direction / np.linalg.norm(direction)).astype(work)
        # q.g * k.g * scale = gap for sinks; split the magnitude evenly between q and k.
        magnitude = math.sqrt(sharpness * _SINK_GAP / scale)
        n_sinks = max(1, min(_SINK_COUNT_MAX, n_tokens // 512))
        sinks = rng.choice(n_tokens, size=n_sinks, replace=False)
        q = noise_q + magnitude * direction
        k = noise_k
        k[sinks] += magnitude * direction
        return q, k
    # diffuse: logits ~ N(0, std^2) whatever the positions.
    # scale * q.k has standard deviation std_q * scale * sqrt(D) with unit-variance keys.
    std_q = sharpness * _DIFFUSE_LOGIT_STD / (scale * math.sqrt(head_dim))
    q = std_q * _normal(rng, (n_tokens, head_dim), work)
    k = _normal(rng, (n_tokens, head_dim), work)
    return q, k


_VALUE_MEAN_STD = 0.5
_VALUE_NOISE_STD = 0.5
_VALUE_WAVES = 16
_VALUE_WAVELENGTHS = (3.0, 30.0)


def _values(positions, head_dim, rng, work):
    """Values ``(N, D)``: per-head mean + smooth random field over the grid + noise.

    The field is a sum of ``_VALUE_WAVES`` plane waves with random 3D directions, wavelengths
    log-uniform in ``_VALUE_WAVELENGTHS`` tokens and phases, mixed into the channels by a
    Gaussian matrix scaled to unit variance per channel.
    """
    direction = rng.standard_normal((_VALUE_WAVES, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = np.exp(rng.uniform(*np.log(_VALUE_WAVELENGTHS), size=_VALUE_WAVES))
    wave_numbers = 2.0 * np.pi * direction / wavelength[:, None]
    phase = rng.uniform(0.0, 2.0 * np.pi, size=_VALUE_WAVES)
    waves = np.cos(positions @ wave_numbers.T + phase).astype(work)  # (N, waves), variance 1/2
    mixing = rng.standard_normal((_VALUE_WAVES, head_dim)) * np.sqrt(2.0 / _VALUE_WAVES)
    mean = _VALUE_MEAN_STD * rng.standard_normal(head_dim)
    noise = _VALUE_NOISE_STD * _normal(rng, (positions.shape[0], head_dim), work)
    return (waves @ mixing.astype(work)) + mean.astype(work) + noise


def video_qkv(shape=(21, 30, 52), heads: Optional[int] = None, head_dim: Optional[int] = None,
              batch: int = 1, kinds: Union[str, Sequence[str]] = HEAD_KINDS, rope: bool = True,
              dtype=np.float32, seed: int = 0, sharpness: float = 1.0):
    """Synthetic video-DiT attention inputs with known per-head structure.

    Heads cycle through ``kinds``; each kind's attention has the structure its name says:

    ``"local"``
        3D neighbourhood of the query: same frame and nearby frames, a few rows and columns.
    ``"temporal"``
        The query's spatial neighbourhood in *every* frame, whatever the frame distance.
    ``"global"``
        A handful of sink tokens (at most 8, at random positions) take most of the mass of
        every row; the rest is spread near-uniformly.
    ``"diffuse"``
        Near-uniform rows (logits with a standard deviation of 0.3 nats).

    Parameters
    ----------
    shape : (int, int, int) or str
        Token grid ``(T, H, W)``, or a name in :data:`SHAPES` (which also sets the default
        ``heads`` and ``head_dim``).
    heads : int, optional
        Number of heads; the registered count for a named shape, else 4.
    head_dim : int, optional
        Channels per head, even and >= 6; the registered value for a named shape, else 64.
    batch : int
        Batch size; batch entries are independent draws.
    kinds : str or sequence of str
        Head kinds from :data:`HEAD_KINDS`, assigned to heads cyclically.
    rope : bool
        Build positional structure by rotating content with 3D RoPE (as the models do). False
        adds the same cosine kernel as absolute Fourier features instead.
    dtype : dtype
        float64, float32, float16 or ``ml_dtypes.bfloat16`` (or ``"bfloat16"``).
    seed : int
        Seed of the NumPy generator; equal seeds give equal arrays.
    sharpness : float
        Multiplies every structured logit amplitude (> 1: peakier rows, sparser attention).

    Returns
    -------
    q, k, v : arrays ``(batch, heads, T*H*W, head_dim)`` of ``dtype``
        Values are a per-head mean (standard deviation 0.5 per channel), plus a field that
        varies smoothly over the grid (unit variance, wavelengths of about 3 to 30 tokens, as
        features of neighbouring patches are alike), plus i.i.d. noise of standard deviation
        0.5. The smooth part is what makes dropping distant keys cost accuracy: with i.i.d.
        values, dropped and kept keys would average to the same vector and errors would look
        smaller than on a real model.

    Examples
    --------
    >>> from pysparse_attn.workloads import video_qkv
    >>> q, k, v = video_qkv((3, 8, 12), heads=2, head_dim=32, seed=1)
    >>> q.shape, q.dtype
    ((1, 2, 288, 32), dtype('float32'))
    """
    if isinstance(shape, str) and shape in SHAPES:
        registered = SHAPES[shape]
        heads = registered.heads if heads is None else heads
        head_dim = registered.head_dim if head_dim is None else head_dim
    grid = _check_grid(shape)
    heads = _positive_int("heads", 4 if heads is None else heads)
    head_dim = _positive_int("head_dim", 64 if head_dim is None else head_dim)
    batch = _positive_int("batch", batch)
    kinds = _check_kinds(kinds)
    dtype = _check_dtype(dtype)
    if not isinstance(rope, bool):
        raise TypeError(f"rope must be a bool, got {type(rope).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(sharpness, bool) or not isinstance(sharpness, (int, float)):
        raise TypeError(f"sharpness must be a real number, got {type(sharpness).__name__}")
    if not (math.isfinite(sharpness) and sharpness > 0):
        raise ValueError(f"sharpness must be positive and finite, got {sharpness}")

    frequencies = rope_frequencies(head_dim)
    positions = grid_positions(grid)
    # float32 working precision is ample for the structure and halves the generation time.
    work = np.float64 if dtype == np.float64 else np.float32
    angles = _rope_angles(positions, frequencies)
    n_tokens = angles.shape[0]
    rotation = (np.cos(angles).astype(work), np.sin(angles).astype(work))
    scale = 1.0 / math.sqrt(head_dim)
    rng = np.random.default_rng(seed)
    shape_out = (batch, heads, n_tokens, head_dim)
    q = np.empty(shape_out, dtype=dtype)
    k = np.empty(shape_out, dtype=dtype)
    v = np.empty(shape_out, dtype=dtype)
    for b in range(batch):
        for h in range(heads):
            q_head, k_head = _head(kinds[h % len(kinds)], rotation, n_tokens, head_dim, scale,
                                   float(sharpness), rng, rope, frequencies)
            q[b, h], k[b, h] = q_head, k_head
            v[b, h] = _values(positions, head_dim, rng, work)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# User tensors

_LAYOUTS = {"bhnd": (0, 1, 2, 3), "bnhd": (0, 2, 1, 3), "hnd": None, "nhd": None}


def _to_bhnd(name, x, layout):
    if layout in ("hnd", "nhd"):
        if x.ndim != 3:
            raise ValueError(f"{name} must be 3-D for layout {layout!r}, got shape {x.shape}")
        x = x[None]
        layout = "b" + layout
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D for layout {layout!r}, got shape {x.shape}")
    return x.transpose(_LAYOUTS[layout])


def load_qkv(path, *, layout: str = "bhnd", mmap: bool = False):
    """Load user-saved q, k, v to evaluate methods on a real model's tensors.

    Accepted files:

    * ``.npz`` with arrays named ``q``, ``k`` and ``v`` (``np.savez(path, q=q, k=k, v=v)``);
    * ``.npy`` holding one stacked array ``(3, ...)`` in the order q, k, v;
    * a directory holding ``q.npy``, ``k.npy`` and ``v.npy``.

    Parameters
    ----------
    path : str or os.PathLike
        The file or directory.
    layout : {"bhnd", "bnhd", "hnd", "nhd"}
        Axis order of the saved arrays; 3-D layouts get a batch axis of one.
    mmap : bool
        Memory-map ``.npy`` files instead of reading them (large captures); the arrays are
        then read-only.

    Returns
    -------
    q, k, v : arrays ``(B, H, N, D)``
        Views in the canonical layout (no copy beyond reading the file); ``k`` and ``v`` may
        have fewer heads than ``q`` (grouped-query attention).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        Unknown layout or file type, missing arrays, wrong ranks, or inconsistent shapes.
    TypeError
        Arrays that are not floating point.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from pysparse_attn.workloads import load_qkv
    >>> x = np.zeros((2, 100, 16), dtype=np.float32)
    >>> path = os.path.join(tempfile.mkdtemp(), "layer3.npz")
    >>> np.savez(path, q=x, k=x, v=x)
    >>> [a.shape for a in load_qkv(path, layout="hnd")]
    [(1, 2, 100, 16), (1, 2, 100, 16), (1, 2, 100, 16)]
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(_LAYOUTS)}, got {layout!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path does not exist: {path}")
    mode = "r" if mmap else None
    if path.is_dir():
        arrays = {}
        for name in ("q", "k", "v"):
            member = path / f"{name}.npy"
            if not member.exists():
                raise ValueError(f"path {path} is a directory without {name}.npy")
            arrays[name] = np.load(member, mmap_mode=mode, allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ("q", "k", "v") if name not in archive.files]
            if missing:
                raise ValueError(f"{path} lacks array(s) {missing}; it holds {archive.files} "
                                 "(save with np.savez(path, q=q, k=k, v=v))")
            arrays = {name: archive[name] for name in ("q", "k", "v")}
    elif path.suffix == ".npy":
        stacked = np.load(path, mmap_mode=mode, allow_pickle=False)
        if stacked.ndim < 1 or stacked.shape[0] != 3:
            raise ValueError(f"{path} must hold q, k, v stacked on a first axis of length 3, "
                             f"got shape {stacked.shape}")
        arrays = {"q": stacked[0], "k": stacked[1], "v": stacked[2]}
    else:
        raise ValueError(f"path must be a .npz, a .npy or a directory, got {path}")

    for name, x in arrays.items():
        if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
            if x.dtype.kind == "V" and x.dtype.itemsize == 2:
                raise TypeError(f"{name} has an opaque 2-byte dtype ({x.dtype}); bfloat16 "
                                "saved by NumPy loses its type: save float32 instead")
            raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
        arrays[name] = _to_bhnd(name, x, layout)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same (B, H, N, D) shape, got {k.shape} and "
                         f"{v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must share batch and head dim (B, H, N, D)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of k's {k.shape[1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return q, k, v
