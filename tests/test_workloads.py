"""Synthetic video workloads have the structure their head kinds promise; the loader validates."""

from __future__ import annotations

import numpy as np
import pytest

from pysparse_attn.workloads import (HEAD_KINDS, SHAPES, grid_positions, load_qkv,
                                     rope_frequencies, video_qkv)

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")


def fresh_seed():
    """A new seed per check; failures print it so they can be replayed."""
    return int(np.random.SeedSequence().entropy % 2**31)


def softmax_rows(q, k):
    logits = (q.astype(np.float64) @ k.astype(np.float64).T) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# An odd grid (partial 64-token tiles, W not a power of two) with enough RoPE pairs per axis.
GRID, HEAD_DIM = (5, 11, 15), 64


@pytest.fixture(scope="module")
def distances():
    positions = grid_positions(GRID)
    return np.abs(positions[:, None, :] - positions[None, :, :])


@pytest.mark.parametrize("rope", [True, False])
def test_head_kinds_have_their_structure(rope, distances):
    seed = fresh_seed()
    q, k, _ = video_qkv(GRID, heads=4, head_dim=HEAD_DIM, kinds=HEAD_KINDS, rope=rope, seed=seed)
    n = distances.shape[0]
    local_window = (distances[..., 0] <= 1) & (distances[..., 1] <= 3) & (distances[..., 2] <= 3)
    same_place = (distances[..., 1] <= 2) & (distances[..., 2] <= 2)
    far_frames = distances[..., 0] >= 2
    p = [softmax_rows(q[0, h], k[0, h]) for h in range(4)]
    uniform_local = local_window.mean()
    local, temporal, sink, diffuse = p
    message = f"seed={seed}, rope={rope}"
    # local: most mass in the 3D neighbourhood, far above a uniform row's share.
    assert (local * local_window).sum(1).mean() > max(0.5, 3 * uniform_local), message
    # temporal: the spatial neighbourhood in distant frames carries real mass; local's does not.
    temporal_far = (temporal * (same_place & far_frames)).sum(1).mean()
    local_far = (local * (same_place & far_frames)).sum(1).mean()
    assert temporal_far > 0.3 and temporal_far > 3 * local_far, message
    # global: a handful of keys (the same for every row) hold nearly all the mass.
    top = np.argsort(-sink, axis=1)[:, :8]
    assert np.sort(sink, axis=1)[:, -8:].sum(1).mean() > 0.9, message
    assert np.unique(top[:, 0]).size <= 8, message
    # diffuse: entropy within 2% of uniform.
    entropy = -(diffuse * np.log(diffuse)).sum(1) / np.log(n)
    assert entropy.mean() > 0.98, message


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16,
                                   "bfloat16"])
def test_shapes_dtypes_and_finiteness(dtype):
    seed = fresh_seed()
    q, k, v = video_qkv((3, 5, 7), heads=3, head_dim=16, batch=2, seed=seed, dtype=dtype)
    expected = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    for x in (q, k, v):
        assert x.shape == (2, 3, 105, 16) and x.dtype == expected
        assert np.isfinite(x.astype(np.float32)).all(), f"seed={seed}"


def test_seed_determines_the_draw():
    seed = fresh_seed()
    first = video_qkv((2, 4, 6), heads=2, head_dim=12, seed=seed)
    again = video_qkv((2, 4, 6), heads=2, head_dim=12, seed=seed)
    other = video_qkv((2, 4, 6), heads=2, head_dim=12, seed=seed + 1)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_batch_entries_are_independent_draws():
    q, _, _ = video_qkv((2, 4, 6), heads=1, head_dim=12, batch=2, seed=fresh_seed())
    assert not np.array_equal(q[0], q[1])


def test_kinds_cycle_over_heads():
    seed = fresh_seed()
    q, k, _ = video_qkv((2, 6, 8), heads=3, head_dim=32, kinds=("diffuse", "global"), seed=seed)
    entropies = []
    for h in range(3):
        p = softmax_rows(q[0, h], k[0, h])
        entropies.append((-(p * np.log(p)).sum(1) / np.log(p.shape[1])).mean())
    # heads 0 and 2 are diffuse, head 1 is a sink head.
    assert entropies[0] > 0.95 and entropies[2] > 0.95 and entropies[1] < 0.5, f"seed={seed}"


def test_named_shapes():
    assert SHAPES["wan2.1-1.3b-480p"].grid == (21, 30, 52)
    assert SHAPES["wan2.1-1.3b-480p"].tokens == 32_760
    assert (SHAPES["wan2.1-1.3b-480p"].heads, SHAPES["wan2.1-1.3b-480p"].head_dim) == (12, 128)
    assert SHAPES["wan2.2-a14b-720p"].tokens == 75_600
    assert SHAPES["wan2.2-a14b-720p"].heads == 40
    assert "pprox" in SHAPES["hunyuanvideo-720p"].note
    # A named shape sets the grid; heads and head_dim can be overridden to keep tests small.
    q, _, _ = video_qkv("wan2.1-1.3b-480p", heads=1, head_dim=8, dtype=np.float16)
    assert q.shape == (1, 1, 32_760, 8)


def test_grid_positions_are_frame_major():
    positions = grid_positions((2, 3, 4))
    assert positions.shape == (24, 3)
    index = (1 * 3 + 2) * 4 + 3
    np.testing.assert_array_equal(positions[index], [1, 2, 3])


def test_rope_frequencies_follow_the_wan_split():
    frame, row, column = rope_frequencies(128)
    assert (frame.size, row.size, column.size) == (22, 21, 21)
    assert frame[0] == 1.0 and np.all(np.diff(frame) < 0)


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(shape=(2, 3)), TypeError, "shape"),
    (dict(shape=(2, 0, 3)), ValueError, "shape"),
    (dict(shape="wan9"), ValueError, "shape"),
    (dict(heads=0), ValueError, "heads"),
    (dict(heads=2.0), TypeError, "heads"),
    (dict(head_dim=7), ValueError, "head_dim"),
    (dict(head_dim=4), ValueError, "head_dim"),
    (dict(batch=0), ValueError, "batch"),
    (dict(kinds=("local", "spiral")), ValueError, "kinds"),
    (dict(kinds=()), ValueError, "kinds"),
    (dict(dtype=np.int32), TypeError, "dtype"),
    (dict(rope=1), TypeError, "rope"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(sharpness=0.0), ValueError, "sharpness"),
    (dict(sharpness=float("nan")), ValueError, "sharpness"),
])
def test_generator_rejects_bad_arguments(kwargs, error, word):
    arguments = dict(shape=(2, 3, 4), heads=1, head_dim=8)
    arguments.update(kwargs)
    with pytest.raises(error, match=word):
        video_qkv(**arguments)


# --------------------------------------------------------------------------------------------
# load_qkv


def random_qkv(shape_q, shape_kv, dtype=np.float32):
    rng = np.random.default_rng(fresh_seed())
    return (rng.standard_normal(shape_q).astype(dtype),
            rng.standard_normal(shape_kv).astype(dtype),
            rng.standard_normal(shape_kv).astype(dtype))


def test_load_npz_in_each_layout(tmp_path):
    q, k, v = random_qkv((2, 4, 37, 8), (2, 2, 37, 8))  # GQA: 4 query heads, 2 kv heads
    path = tmp_path / "bhnd.npz"
    np.savez(path, q=q, k=k, v=v)
    for got, want in zip(load_qkv(path), (q, k, v)):
        np.testing.assert_array_equal(got, want)
    path = tmp_path / "bnhd.npz"
    np.savez(path, q=q.transpose(0, 2, 1, 3), k=k.transpose(0, 2, 1, 3),
             v=v.transpose(0, 2, 1, 3))
    for got, want in zip(load_qkv(path, layout="bnhd"), (q, k, v)):
        np.testing.assert_array_equal(got, want)
    path = tmp_path / "nhd.npz"
    np.savez(path, q=q[0].transpose(1, 0, 2), k=k[0].transpose(1, 0, 2),
             v=v[0].transpose(1, 0, 2))
    for got, want in zip(load_qkv(path, layout="nhd"), (q, k, v)):
        np.testing.assert_array_equal(got, want[:1])


def test_load_stacked_npy_and_directory(tmp_path):
    q, k, v = random_qkv((1, 3, 29, 8), (1, 3, 29, 8), np.float16)
    np.save(tmp_path / "stacked.npy", np.stack([q, k, v]))
    for got, want in zip(load_qkv(tmp_path / "stacked.npy", mmap=True), (q, k, v)):
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable  # memory-mapped read-only: the file cannot be changed
    folder = tmp_path / "capture"
    folder.mkdir()
    for name, x in zip("qkv", (q, k, v)):
        np.save(folder / f"{name}.npy", x)
    for got, want in zip(load_qkv(str(folder)), (q, k, v)):
        np.testing.assert_array_equal(got, want)


def test_loader_errors_name_the_problem(tmp_path):
    q, k, v = random_qkv((1, 2, 10, 4), (1, 2, 10, 4))
    with pytest.raises(FileNotFoundError):
        load_qkv(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="layout"):
        load_qkv(tmp_path, layout="nchw")
    with pytest.raises(TypeError, match="path"):
        load_qkv(3)
    np.savez(tmp_path / "missing.npz", q=q, k=k)
    with pytest.raises(ValueError, match="'v'"):
        load_qkv(tmp_path / "missing.npz")
    np.savez(tmp_path / "rank.npz", q=q[0], k=k[0], v=v[0])
    with pytest.raises(ValueError, match="4-D"):
        load_qkv(tmp_path / "rank.npz")
    np.savez(tmp_path / "ints.npz", q=q.astype(np.int32), k=k, v=v)
    with pytest.raises(TypeError, match="q must be floating"):
        load_qkv(tmp_path / "ints.npz")
    np.savez(tmp_path / "kv.npz", q=q, k=k, v=v[:, :, :5])
    with pytest.raises(ValueError, match="k and v"):
        load_qkv(tmp_path / "kv.npz")
    np.savez(tmp_path / "heads.npz", q=q[:, :1], k=k, v=v)
    with pytest.raises(ValueError, match="multiple"):
        load_qkv(tmp_path / "heads.npz")
    np.savez(tmp_path / "mixed.npz", q=q.astype(np.float64), k=k, v=v)
    with pytest.raises(TypeError, match="dtype"):
        load_qkv(tmp_path / "mixed.npz")
    np.save(tmp_path / "two.npy", np.stack([q, k]))
    with pytest.raises(ValueError, match="length 3"):
        load_qkv(tmp_path / "two.npy")
    (tmp_path / "text.txt").write_text("q")
    with pytest.raises(ValueError, match=".npz"):
        load_qkv(tmp_path / "text.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="q.npy"):
        load_qkv(tmp_path / "empty_dir")


def test_trajectory_heads_made_on_threads_equal_the_serial_ones(monkeypatch):
    from pysparse_attn import workloads

    trajectory = workloads.denoising_trajectory((2, 8, 16), steps=3, heads=3, head_dim=32,
                                                jumps=(2,))
    monkeypatch.setattr(workloads, "_PARALLEL_MIN_ELEMENTS", 1)
    threaded = trajectory[2]
    monkeypatch.setattr(workloads, "_PARALLEL_MIN_ELEMENTS", 1 << 40)
    serial = trajectory[2]
    for a, b in zip(threaded, serial):
        np.testing.assert_array_equal(a, b)
