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


# ---------------------------------------------------------------------------------------------
# Denoising trajectories: q, k, v of one layer along a sampler's steps
#
# Synthetic, and documented as such: no model is run. The structure of each head comes from
# the video-like generator above; what a trajectory adds is how a sampler moves it.
#
# * Noise to structure. A flow-matching sampler (Wan, HunyuanVideo) denoises
#   ``x_s = (1 - sigma_s) x0 + sigma_s eps`` with ONE noise draw ``eps`` for the whole run, so
#   each step mixes a structured part (the generator's head) with a fixed noise part, as
#   ``sqrt(1 - w^2)`` structure to ``w`` noise with ``w = sigma^noise_power``: variance
#   preserving, since Wan RMS-normalises q and k, and with the noise fading faster than the
#   latent's own (``noise_power > 1``) because a layer's features carry the network's estimate
#   of the clean video, which forms well before the latent's noise is gone; only the first
#   steps look like noise.
# * Drift. The structure follows a motion track: queries and keys are rotated at co-moving
#   positions ``(t, y - vy t, x - vx t)``, so a head attends along the track, and the velocity
#   moves across the steps (the model settling where things go); the locality sharpens (early
#   steps attend broadly, late steps to detail) by a sharpness that grows across the steps.
# * Jitter. A small fresh draw per step stands for the model's step-to-step changes.
# * Jumps. At the steps named in ``jumps`` the structured part is redrawn (new head content,
#   sinks and value field): the attention pattern changes at once, as a guard must notice.

__all__ += ["Trajectory", "denoising_trajectory", "flow_sigmas", "load_trajectory"]

_TRAJECTORY_NOISE_LOGIT_STD = 1.0
_TRAJECTORY_SEED_TAG = {"structure": 1, "values": 2, "noise": 3, "jitter": 4}


def flow_sigmas(steps: int, shift: float = 5.0) -> np.ndarray:
    """Noise levels of a shifted flow-matching schedule (Wan's sampler), one per step.

    ``sigma = shift t / (1 + (shift - 1) t)`` at ``t = 1 - s / steps`` for step ``s``: the first
    step is pure noise (``sigma = 1``), the last close to clean; ``shift > 1`` spends more
    steps at high noise, as Wan's ``sample_shift`` of 5 does at 480p.

    Parameters
    ----------
    steps : int
        Number of sampler steps.
    shift : float
        Schedule shift, positive.

    Returns
    -------
    sigmas : float64 array ``(steps,)``, decreasing, in ``(0, 1]``.

    Examples
    --------
    >>> from pysparse_attn.workloads import flow_sigmas
    >>> flow_sigmas(4, shift=1.0)
    array([1.  , 0.75, 0.5 , 0.25])
    """
    steps = _positive_int("steps", steps)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise TypeError(f"shift must be a real number, got {type(shift).__name__}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be positive and finite, got {shift}")
    t = 1.0 - np.arange(steps) / steps
    return shift * t / (1.0 + (shift - 1.0) * t)


def _real_pair(name, value, positive=False) -> tuple:
    """``(start, end)`` of a quantity that moves across the steps; a scalar stays constant."""
    pair = value if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be a number or a (start, end) pair, got {value!r}")
    out = []
    for x in pair:
        if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
            raise TypeError(f"{name} must hold real numbers, got {value!r}")
        x = float(x)
        if not math.isfinite(x) or (positive and x <= 0):
            raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, "
                             f"got {value!r}")
        out.append(x)
    return tuple(out)


@dataclass(frozen=True)
class Trajectory:
    """q, k, v of one attention layer along a sampler's steps, produced on demand.

    A sequence: ``len(trajectory)`` steps, ``trajectory[s]`` is ``(q, k, v)`` of step ``s``
    in ``(B, H, N, D)`` layout (made or read when asked for, so a 50-step trajectory of a
    full-size model is never held in memory at once), and iteration walks the steps in order.
    Build one with :func:`denoising_trajectory` (synthetic) or :func:`load_trajectory` (a
    user's saved tensors).

    Attributes
    ----------
    steps : int
        Number of steps.
    grid : (int, int, int) or None
        Token grid ``(T, H, W)`` when known (tokens frame-major), else None.
    sigmas : float64 array ``(steps,)`` or None
        Noise level of each step when known.
    description : dict
        What the trajectory is (generator parameters or the files), for result records.
    """

    steps: int
    grid: Optional[tuple]
    sigmas: Optional[np.ndarray]
    description: dict
    _step: object

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step):
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not -self.steps <= step < self.steps:
            raise IndexError(f"step {step} out of range for a trajectory of {self.steps} steps")
        return self._step(int(step) % self.steps)

    def __iter__(self):
        for step in range(self.steps):
            yield self._step(step)


def _trajectory_rng(seed, batch, head, tag, *more):
    return np.random.default_rng([seed, batch, head, _TRAJECTORY_SEED_TAG[tag], *more])


def _co_moving_rotation(positions, velocity, frequencies, work):
    moved = positions.astype(np.float64)
    moved[:, 1] -= velocity[0] * positions[:, 0]
    moved[:, 2] -= velocity[1] * positions[:, 0]
    angles = _rope_angles(moved, frequencies)
    return np.cos(angles).astype(work), np.sin(angles).astype(work), moved


# Heads are drawn from their own seeded generators, so they can be made in any order: threads
# (NumPy's random fills and ufuncs release the GIL) make a full-size step several times faster
# on a many-core host, with bit-identical tensors.
_PARALLEL_MIN_ELEMENTS = 1 << 18


def _for_each_head(make_head, batch, heads, elements_per_head):
    """``make_head(b, h)`` for every (batch, head), on threads when the heads are large."""
    pairs = [(b, h) for b in range(batch) for h in range(heads)]
    workers = min(len(pairs), os.cpu_count() or 1)
    if workers < 2 or elements_per_head < _PARALLEL_MIN_ELEMENTS:
        for b, h in pairs:
            make_head(b, h)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(make_head, b, h) for b, h in pairs]:
            future.result()  # re-raises a head's exception here


def denoising_trajectory(shape=(5, 8, 12), steps: int = 20, heads: Optional[int] = None,
                         head_dim: Optional[int] = None, batch: int = 1,
                         kinds: Union[str, Sequence[str]] = HEAD_KINDS, dtype=np.float32,
                         seed: int = 0, shift: float = 5.0, sharpness=(1.0, 2.5),
                         motion=((0.0, 0.0), (1.0, 0.5)), jitter: float = 0.05,
                         noise_power: float = 8.0, jumps: Sequence[int] = ()) -> Trajectory:
    """A synthetic denoising trajectory: video-like attention from noise to structure, drifting.

    **Synthetic.** No model is run; the trajectory imitates what a flow-matching sampler does to
    one attention layer (the comment block above this function in ``workloads.py`` gives the
    reasoning): step ``s`` mixes a structured part, :func:`video_qkv`'s head of the same kind,
    with one fixed noise draw, as ``sqrt(1 - w^2)`` to ``w`` with ``w = sigma_s^noise_power``
    (variance preserving, which keeps the logits' size as q/k RMSNorm does), so the first steps
    are noise-dominated (near-uniform rows) and the later ones structure-dominated. Across the steps the structure drifts: it follows a motion
    track whose velocity moves linearly from ``motion[0]`` at the first step to ``motion[1]``
    at the last, and its sharpness geometrically from ``sharpness[0]`` to ``sharpness[1]``
    (the same drift at every step); every step adds a small fresh jitter; at the steps in
    ``jumps`` the structure is redrawn outright.

    Parameters
    ----------
    shape : (int, int, int) or str
        Token grid ``(T, H, W)`` or a name in :data:`SHAPES`, as in :func:`video_qkv`.
    steps : int
        Sampler steps.
    heads, head_dim, batch, kinds
        As in :func:`video_qkv`.
    dtype : dtype
        float64, float32, float16 or bfloat16.
    seed : int
        Equal seeds (and parameters) give equal tensors at every step, in any access order.
    shift : float
        Schedule shift of :func:`flow_sigmas`.
    sharpness : float or (float, float)
        Structure sharpness at the first and the last step (a number: constant).
    motion : (vy, vx) or ((vy, vx), (vy, vx))
        Velocity of the motion track in tokens per frame along rows and columns, at the first
        and the last step (one pair: constant).
    jitter : float
        Standard deviation of each step's fresh draw, relative to one unit per channel of the
        structured content (0: none).
    noise_power : float
        How fast the noise part fades: its weight is ``sigma ** noise_power`` (1: as fast as
        the latent's ``sigma``; larger: the structure emerges earlier in the run).
    jumps : sequence of int
        Steps at which the structured part is redrawn (each in ``1 .. steps - 1``).

    Returns
    -------
    Trajectory
        ``trajectory[s]`` gives ``(q, k, v)``, each ``(batch, heads, T*H*W, head_dim)`` of
        ``dtype``; ``trajectory.sigmas`` the schedule; ``trajectory.grid`` the token grid.

    Examples
    --------
    >>> from pysparse_attn.workloads import denoising_trajectory
    >>> trajectory = denoising_trajectory((3, 4, 6), steps=5, heads=2, head_dim=24)
    >>> len(trajectory), trajectory[4][0].shape
    (5, (1, 2, 72, 24))
    """
    if isinstance(shape, str) and shape in SHAPES:
        registered = SHAPES[shape]
        heads = registered.heads if heads is None else heads
        head_dim = registered.head_dim if head_dim is None else head_dim
    grid = _check_grid(shape)
    steps = _positive_int("steps", steps)
    heads = _positive_int("heads", 4 if heads is None else heads)
    head_dim = _positive_int("head_dim", 64 if head_dim is None else head_dim)
    batch = _positive_int("batch", batch)
    kinds = _check_kinds(kinds)
    dtype = _check_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (it seeds NumPy's SeedSequence), got {seed}")
    sigmas = flow_sigmas(steps, shift)
    sharpness = _real_pair("sharpness", sharpness, positive=True)
    if (isinstance(motion, (tuple, list)) and len(motion) == 2
            and all(isinstance(m, (tuple, list)) for m in motion)):
        motion_pairs = (_real_pair("motion", motion[0]), _real_pair("motion", motion[1]))
    else:
        motion_pairs = (_real_pair("motion", motion),) * 2
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
        raise TypeError(f"jitter must be a real number, got {type(jitter).__name__}")
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be finite and >= 0, got {jitter}")
    if isinstance(noise_power, bool) or not isinstance(noise_power, (int, float)):
        raise TypeError(f"noise_power must be a real number, got {type(noise_power).__name__}")
    if not (math.isfinite(noise_power) and noise_power > 0):
        raise ValueError(f"noise_power must be positive and finite, got {noise_power}")
    jumps = tuple(sorted(set(int(j) for j in jumps)))
    for j in jumps:
        if not 1 <= j < steps:
            raise ValueError(f"jumps must lie in 1 .. {steps - 1}, got {j}")

    frequencies = rope_frequencies(head_dim)
    positions = grid_positions(grid)
    n_tokens = positions.shape[0]
    work = np.float64 if dtype == np.float64 else np.float32
    scale = 1.0 / math.sqrt(head_dim)
    # Noise part: i.i.d. q, k whose logits have a standard deviation of
    # _TRAJECTORY_NOISE_LOGIT_STD nats (scale * q.k has variance a^4 for N(0, a^2) channels).
    noise_amplitude = math.sqrt(_TRAJECTORY_NOISE_LOGIT_STD)

    def make_step(step):
        sigma = float(sigmas[step])
        progress = step / (steps - 1) if steps > 1 else 1.0
        sharp = sharpness[0] * (sharpness[1] / sharpness[0]) ** progress
        velocity = tuple(a + (b - a) * progress for a, b in zip(*motion_pairs))
        segment = sum(1 for j in jumps if j <= step)
        cos, sin, moved = _co_moving_rotation(positions, velocity, frequencies, work)
        noise_weight = sigma ** noise_power
        structure_weight = math.sqrt(1.0 - noise_weight * noise_weight)
        out = [np.empty((batch, heads, n_tokens, head_dim), dtype=dtype) for _ in range(3)]

        def make_head(b, h):
            # Re-seeding per step replays the same head content, sinks and value field;
            # only the positions (motion) and the sharpness move.
            q_s, k_s = _head(kinds[h % len(kinds)], (cos, sin), n_tokens, head_dim, scale,
                             sharp, _trajectory_rng(seed, b, h, "structure", segment),
                             True, frequencies)
            v_s = _values(moved, head_dim, _trajectory_rng(seed, b, h, "values", segment), work)
            noise = _trajectory_rng(seed, b, h, "noise")
            q_n = noise_amplitude * _normal(noise, (n_tokens, head_dim), work)
            k_n = noise_amplitude * _normal(noise, (n_tokens, head_dim), work)
            v_n = _normal(noise, (n_tokens, head_dim), work)
            q = structure_weight * q_s + noise_weight * q_n
            k = structure_weight * k_s + noise_weight * k_n
            v = structure_weight * v_s + noise_weight * v_n
            if jitter:
                fresh = _trajectory_rng(seed, b, h, "jitter", step)
                q = q + jitter * _normal(fresh, (n_tokens, head_dim), work)
                k = k + jitter * _normal(fresh, (n_tokens, head_dim), work)
                v = v + jitter * _normal(fresh, (n_tokens, head_dim), work)
            out[0][b, h], out[1][b, h], out[2][b, h] = q, k, v

        _for_each_head(make_head, batch, heads, n_tokens * head_dim)
        return tuple(out)

    description = {
        "generator": "denoising_trajectory", "grid": list(grid), "steps": steps,
        "heads": heads, "head_dim": head_dim, "batch": batch, "kinds": list(kinds),
        "dtype": str(dtype), "seed": int(seed), "shift": float(shift),
        "sharpness": list(sharpness), "motion": [list(m) for m in motion_pairs],
        "jitter": float(jitter), "noise_power": float(noise_power), "jumps": list(jumps)}
    return Trajectory(steps, grid, sigmas, description, make_step)


def _natural_key(path: Path):
    """Sort key putting ``step_2`` before ``step_10``: digit runs compare as numbers."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_trajectory(path, *, layout: str = "bhnd", mmap: bool = False, grid=None,
                    sigmas=None) -> Trajectory:
    """A user's saved per-step q, k, v as a :class:`Trajectory` (read step by step).

    ``path`` is a directory with one entry per step, in natural order of the names (``step_2``
    before ``step_10``): each entry a file or directory :func:`load_qkv` reads (``.npz`` with
    ``q``, ``k``, ``v``; a stacked ``.npy``; a directory of ``q.npy``, ``k.npy``, ``v.npy``).
    Other files (a ``README``) are ignored, except two optional ones: ``grid.npy`` (the token
    grid ``(T, H, W)``) and ``sigmas.npy`` (one noise level per step), read when ``grid`` or
    ``sigmas`` is not given. Save from a sampler with, e.g.,
    ``np.savez(f"capture/step_{s:03d}.npz", q=q, k=k, v=v)`` (``bench/reuse_on_model.py``
    writes such a capture of a trained model's layer).

    Parameters
    ----------
    path : str or os.PathLike
        The directory.
    layout : {"bhnd", "bnhd", "hnd", "nhd"}
        Axis order of the saved arrays, as in :func:`load_qkv`.
    mmap : bool
        Memory-map ``.npy`` files.
    grid : (int, int, int), optional
        The token grid ``(T, H, W)`` of the capture, when known (lets plan reuse dilate in
        the grid); its product must equal the sequence length. Default: ``path/grid.npy``
        when it exists, else None.
    sigmas : sequence of float, optional
        Noise level of each step. Default: ``path/sigmas.npy`` when it exists, else None.

    Returns
    -------
    Trajectory
        Each step is read when asked for; a step whose shapes or dtype differ from those of
        the first step read raises ``ValueError``/``TypeError`` naming the file.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a directory, holds no step, or ``sigmas`` has the wrong length.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from pysparse_attn.workloads import load_trajectory
    >>> root = tempfile.mkdtemp()
    >>> x = np.zeros((1, 2, 24, 8), dtype=np.float32)
    >>> for s in (0, 1, 10):
    ...     np.savez(os.path.join(root, f"step_{s}.npz"), q=x, k=x, v=x)
    >>> trajectory = load_trajectory(root, grid=(2, 3, 4))
    >>> len(trajectory), trajectory.description["files"]
    (3, ['step_0.npz', 'step_1.npz', 'step_10.npz'])
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"path does not exist: {root}")
    if not root.is_dir():
        raise ValueError(f"path must be a directory of per-step captures, got file {root}")
    entries = sorted((p for p in root.iterdir()
                      if (p.is_dir() and (p / "q.npy").exists())
                      or (p.suffix == ".npz")
                      or (p.suffix == ".npy" and p.stem not in ("sigmas", "grid"))),
                     key=_natural_key)
    if not entries:
        raise ValueError(f"path {root} holds no per-step capture (.npz, stacked .npy, or a "
                         "directory with q.npy, k.npy, v.npy)")
    if grid is None and (root / "grid.npy").is_file():
        grid = tuple(int(x) for x in np.load(root / "grid.npy").reshape(-1))
    if grid is not None:
        grid = _check_grid(grid)
    if sigmas is None and (root / "sigmas.npy").is_file():
        sigmas = np.load(root / "sigmas.npy")
    if sigmas is not None:
        sigmas = np.asarray(sigmas, dtype=np.float64)
        if sigmas.shape != (len(entries),):
            raise ValueError(f"sigmas must hold one value per step ({len(entries)}), got "
                             f"shape {sigmas.shape}")
    first = {}

    def read_step(step):
        q, k, v = load_qkv(entries[step], layout=layout, mmap=mmap)
        signature = (q.shape, k.shape, q.dtype)
        if not first:
            if grid is not None and int(np.prod(grid)) != q.shape[2]:
                raise ValueError(f"grid {grid} has {int(np.prod(grid))} tokens but "
                                 f"{entries[step].name} has sequence length {q.shape[2]}")
            first["signature"], first["name"] = signature, entries[step].name
        elif signature[:2] != first["signature"][:2]:
            raise ValueError(f"{entries[step].name} has q {q.shape}, k {k.shape}; "
                             f"{first['name']} has q {first['signature'][0]}, "
                             f"k {first['signature'][1]}")
        elif signature[2] != first["signature"][2]:
            raise TypeError(f"{entries[step].name} has dtype {q.dtype}, {first['name']} "
                            f"{first['signature'][2]}")
        return q, k, v

    description = {"loader": "load_trajectory", "path": str(root), "layout": layout,
                   "files": [p.name for p in entries],
                   "grid": None if grid is None else list(grid)}
    return Trajectory(len(entries), grid, sigmas, description, read_step)


# ---------------------------------------------------------------------------------------------
# Moving-pattern videos: training data for fine-tuning demonstrations.
#
# A video DiT's self-attention is structured by motion: a token attends to its neighbourhood
# and to the same object in other frames, displaced by the object's velocity. The smallest
# data with that structure is a few soft blobs, each drifting at its own constant velocity
# (wrapping around the frame), mixed into the latent channels with random weights. A model
# that denoises such clips must look along the motion, which is what makes sparse attention
# at high sparsity lose something, and what fine-tuning SLA's linear branch can win back.

__all__ += ["moving_patterns"]


def moving_patterns(batch: int, channels: int = 4, frames: int = 8, height: int = 16,
                    width: int = 16, *, blobs: int = 3, max_speed: float = 1.5,
                    seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Synthetic latent videos of soft blobs drifting at constant velocities.

    Each clip holds ``blobs`` Gaussian blobs (radius 1.5 to 3 pixels) with random start
    positions and velocities (up to ``max_speed`` pixels a frame along each axis), wrapping
    around the frame edges; each channel is a random signed mix of the blobs, and the clip is
    normalised to zero mean and unit variance. Made in code, so tests and documentation can
    train on it without any download. **Synthetic:** it has the motion structure of video
    latents, none of their content.

    Parameters
    ----------
    batch : int
        Number of clips.
    channels, frames, height, width : int
        Latent shape of one clip.
    blobs : int
        Blobs per clip.
    max_speed : float
        Largest velocity component, pixels per frame (non-negative).
    seed : int
        Seed of the draw (same seed, same clips).
    dtype : float dtype
        Of the result.

    Returns
    -------
    videos : array ``(batch, channels, frames, height, width)``

    Examples
    --------
    >>> from pysparse_attn.workloads import moving_patterns
    >>> videos = moving_patterns(2, channels=4, frames=3, height=8, width=8)
    >>> videos.shape, round(float(videos[0].std()), 6)
    ((2, 4, 3, 8, 8), 1.0)
    """
    batch, channels, frames, height, width, blobs = (
        _positive_int(name, value) for name, value in (
            ("batch", batch), ("channels", channels), ("frames", frames),
            ("height", height), ("width", width), ("blobs", blobs)))
    if isinstance(max_speed, bool) or not isinstance(max_speed, (int, float)):
        raise TypeError(f"max_speed must be a real number, got {type(max_speed).__name__}")
    if not (math.isfinite(max_speed) and max_speed >= 0):
        raise ValueError(f"max_speed must be non-negative and finite, got {max_speed}")
    dtype = _check_dtype(dtype)
    rng = np.random.default_rng(seed)
    start = rng.uniform(0.0, 1.0, (batch, blobs, 2)) * (height, width)
    velocity = rng.uniform(-max_speed, max_speed, (batch, blobs, 2))
    radius = rng.uniform(1.5, 3.0, (batch, blobs))
    mix = rng.standard_normal((batch, channels, blobs))
    t = np.arange(frames, dtype=np.float64)
    y = np.arange(height, dtype=np.float64)
    x = np.arange(width, dtype=np.float64)
    # Blob centres (batch, blobs, frames); distances wrap around (a torus), so blobs re-enter.
    cy = start[..., 0, None] + velocity[..., 0, None] * t
    cx = start[..., 1, None] + velocity[..., 1, None] * t
    dy = (y - cy[..., None] + height / 2) % height - height / 2
    dx = (x - cx[..., None] + width / 2) % width - width / 2
    r2 = 2.0 * radius[..., None, None, None] ** 2
    field = np.exp(-dy[..., :, None] ** 2 / r2) * np.exp(-dx[..., None, :] ** 2 / r2)
    videos = np.einsum("bcn,bnfyx->bcfyx", mix, field)
    videos -= videos.mean(axis=(1, 2, 3, 4), keepdims=True)
    videos /= videos.std(axis=(1, 2, 3, 4), keepdims=True) + 1e-12
    return videos.astype(dtype)
