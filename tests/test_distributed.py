"""Sequence-parallel schemes (pysparse_attn.distributed) against the single-device result.

Ranks are simulated by :class:`LocalWorld` (threads exchanging copies) for world sizes 1-4, and
by two real processes over torch.distributed's gloo backend when torch is importable.

Tolerances: float64 runs use the float64 reference backend, where a merge by LSE reorders
sums of positive terms only (relative error a few ulp times the number of shards): 1e-10.
float32 runs use the CPU backend (float32 accumulation): 2e-5 absolute on O(1) outputs, the
rounding of a float32 softmax over <100 keys merged over <= 4 shards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import pysparse_attn as psa
from pysparse_attn import distributed as dist

BLOCK = (8, 8)
TOL = {np.float64: 1e-10, np.float32: 2e-5}
BACKEND = {np.float64: "reference", np.float32: "cpu"}

# Heads per world size: Ulysses shards heads, so Hq is a multiple of W and GQA groups split
# evenly (8 query heads on 2 kv heads for W = 2, 4; multi-query for W = 3).
HEADS = {1: (4, 2), 2: (8, 2), 3: (6, 1), 4: (8, 2)}


def _inputs(seed, Hq, Hkv, Nq, Nk, dtype=np.float64, sharp=1.0, D=8):
    rng = np.random.default_rng(seed)
    q = sharp * rng.standard_normal((2, Hq, Nq, D))
    k = sharp * rng.standard_normal((2, Hkv, Nk, D))
    v = rng.standard_normal((2, Hkv, Nk, D))
    do = rng.standard_normal((2, Hq, Nq, D))
    return tuple(x.astype(dtype) for x in (q, k, v, do))


def _bounds(n, world, tile, seed=0):
    """Shard boundaries of ``n`` rows over ``world`` ranks: whole tiles, unequal, last partial."""
    tiles = -(-n // tile)
    rng = np.random.default_rng(seed + world)
    cuts = np.sort(rng.choice(np.arange(1, tiles), size=world - 1, replace=False)) * tile
    return [0, *cuts.tolist(), n]


def _split(x, bounds):
    return [x[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _join(parts, axis=2):
    return np.concatenate(parts, axis=axis)


def _assert_close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- communicators

def test_local_world_collectives_move_what_was_sent():
    world = dist.LocalWorld(3)

    def body(comm):
        mine = np.full((2,), comm.rank, dtype=np.int32)
        gathered = comm.allgather(mine)
        chunks = [np.full((comm.rank + 1, j + 1), 10 * comm.rank + j, np.float32)
                  for j in range(comm.size)]
        recvs = [dist.Recv((i + 1, comm.rank + 1), np.float32, i) for i in range(comm.size)]
        return gathered, comm.alltoall(chunks, recvs)

    for rank, (gathered, received) in enumerate(world.run(body)):
        assert [int(g[0]) for g in gathered] == [0, 1, 2]
        for i, block in enumerate(received):
            assert block.shape == (i + 1, rank + 1)
            assert np.all(block == 10 * i + rank)


def test_local_world_failure_in_one_rank_aborts_the_others():
    world = dist.LocalWorld(2, timeout=30)

    def body(comm):
        if comm.rank == 0:
            raise KeyError("rank 0 broke")
        return comm.exchange([], [dist.Recv((1,), np.float64, 0)])

    with pytest.raises(KeyError, match="rank 0 broke"):
        world.run(body)


def test_disable_nvlink_multicast_sets_every_switch():
    env = {"NCCL_NVLS_ENABLE": "1"}
    dist.disable_nvlink_multicast(env)
    assert env == dist.NVLINK_MULTICAST_OFF
    assert env["NCCL_NVLS_ENABLE"] == "0"


def test_comm_must_be_a_communicator():
    q = np.zeros((1, 1, 8, 4))
    with pytest.raises(TypeError, match="comm"):
        dist.ring_attention(q, q, q, object())


# ----------------------------------------------------------------------------- Ulysses

def _ulysses(world_size, q, k, v, **options):
    world = dist.LocalWorld(world_size)
    qb, kb = _bounds(q.shape[2], world_size, 1, 3), _bounds(k.shape[2], world_size, 1, 5)
    results = world.run(
        lambda comm, a, b, c: dist.ulysses_attention(a, b, c, comm, return_stats=True,
                                                     **options),
        _split(q, qb), _split(k, kb), _split(v, kb))
    return results, qb, kb


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", ["dense", "mask", "recall", "topk"])
def test_ulysses_equals_single_device(world_size, case):
    Hq, Hkv = HEADS[world_size]
    q, k, v, _ = _inputs(world_size, Hq, Hkv, 53, 91, sharp=3.0)  # cross-attention, partial
    nq, nk = -(-53 // 8), -(-91 // 8)
    options = {"block": BLOCK, "backend": "reference"}
    if case == "mask":
        mask = np.random.default_rng(7).random((2, Hq, nq, nk)) < 0.5
        mask[..., 0] = True
        options["select"] = psa.BlockMask(mask)
    elif case == "recall":
        options["skip"] = psa.Recall(0.9)
    elif case == "topk":
        options["select"] = psa.TopK(k=3)
    expected, stats = psa.attention(q, k, v, return_stats=True, **options)
    results, qb, _ = _ulysses(world_size, q, k, v, **options)
    _assert_close(_join([r[0] for r in results]), expected, 1e-12, "output")
    _assert_close(_join([r[1].lse for r in results]), stats.lse, 1e-12, "lse")
    _assert_close(_join([r[1].recall_bound for r in results]), stats.recall_bound, 1e-12,
                  "recall_bound")
    kept = _join([r[1].local.kept for r in results], axis=1)
    assert np.array_equal(kept, stats.kept)
    if case == "recall":
        assert stats.sparsity > 0, "the workload should let Recall skip something"


def test_ulysses_cuts_per_head_rule_parameters():
    rule = psa.Recall(np.linspace(0.8, 0.95, 8))
    cut = dist._slice_rule(rule, slice(2, 4), 8)
    np.testing.assert_array_equal(cut.target, rule.target[2:4])
    assert dist._slice_rule(psa.Blasst(1e-3), slice(0, 4), 8) == psa.Blasst(1e-3)
    with pytest.raises(ValueError, match="skip"):
        dist._slice_rule(rule, slice(0, 3), 6)


def test_ulysses_per_head_rule_equals_single_device():
    q, k, v, _ = _inputs(3, 8, 2, 40, 40, sharp=1.8)
    options = {"block": BLOCK, "backend": "reference",
               "skip": psa.Recall(np.linspace(0.8, 0.95, 8))}
    try:
        expected = psa.attention(q, k, v, **options)
    except ValueError as error:
        if "per-head" not in str(error):
            raise
        pytest.skip(f"the backends of this tree do not take per-head parameters yet ({error})")
    results, _, _ = _ulysses(2, q, k, v, **options)
    _assert_close(_join([r[0] for r in results]), expected, 1e-12, "output")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ulysses_gradients_equal_single_device(world_size):
    Hq, Hkv = HEADS[world_size]
    q, k, v, do = _inputs(10 + world_size, Hq, Hkv, 41, 41, sharp=1.8)
    options = {"block": BLOCK, "backend": "reference", "skip": psa.Recall(0.9)}
    _, stats = psa.attention(q, k, v, return_stats=True, **options)
    expected = psa.attention_vjp(q, k, v, do, kept=stats.kept, **options)
    world = dist.LocalWorld(world_size)
    bounds = _bounds(41, world_size, 1, 1)

    def body(comm, a, b, c, g):
        _, st = dist.ulysses_attention(a, b, c, comm, return_stats=True, **options)
        return dist.ulysses_attention_vjp(a, b, c, g, comm, kept=st.local.kept, **options)

    grads = world.run(body, *(_split(x, bounds) for x in (q, k, v, do)))
    for i, name in enumerate(("dq", "dk", "dv")):
        _assert_close(_join([g[i] for g in grads]), expected[i], 1e-12, name)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ulysses_sla_forward_and_gradients(world_size):
    Hq, Hkv = HEADS[world_size]
    q, k, v, do = _inputs(20 + world_size, Hq, Hkv, 48, 48)
    rng = np.random.default_rng(4)
    options = {"block": BLOCK, "backend": "reference", "critical": 0.3, "negligible": 0.3,
               "proj_weight": 0.1 * rng.standard_normal((8, 8)),
               "proj_bias": 0.1 * rng.standard_normal(8)}
    expected = psa.sla_attention(q, k, v, **options)
    expected_grads = psa.sla_vjp(q, k, v, do, **options)
    world = dist.LocalWorld(world_size)
    bounds = _bounds(48, world_size, 1, 2)

    def body(comm, a, b, c, g):
        out = dist.ulysses_attention(a, b, c, comm, sla=True, **options)
        return out, dist.ulysses_attention_vjp(a, b, c, g, comm, sla=True, **options)

    results = world.run(body, *(_split(x, bounds) for x in (q, k, v, do)))
    _assert_close(_join([r[0] for r in results]), expected, 1e-12, "sla output")
    for i, name in enumerate(("dq", "dk", "dv")):
        _assert_close(_join([r[1][i] for r in results]), expected_grads[i], 1e-12, name)
    for r in results:  # dW, db: the same totals on every rank
        _assert_close(r[1][3], expected_grads[3], 1e-12, "dW")
        _assert_close(r[1][4], expected_grads[4], 1e-12, "db")


def test_ulysses_rejects_heads_that_do_not_split():
    q, k, v, _ = _inputs(0, 6, 2, 16, 16)  # 6 heads on 4 ranks; groups of 3 on 3 ranks of 2
    for world_size, match in ((4, "cannot split evenly"), (3, "unevenly")):
        if world_size == 3:
            q, k, v, _ = _inputs(0, 6, 2, 16, 16)
        world = dist.LocalWorld(world_size)
        bounds = _bounds(16, world_size, 1)
        with pytest.raises(ValueError, match=match):
            world.run(lambda comm, a, b, c: dist.ulysses_attention(a, b, c, comm, block=BLOCK),
                      _split(q, bounds), _split(k, bounds), _split(v, bounds))


# ----------------------------------------------------------------------------- ring

def _ring(world_size, q, k, v, q_bounds, k_bounds, masks=None, **options):
    world = dist.LocalWorld(world_size)
    per_rank = [_split(q, q_bounds), _split(k, k_bounds), _split(v, k_bounds)]

    rest = {name: value for name, value in options.items() if name != "select"}

    def body(comm, a, b, c, mask=None):
        select = options.get("select") if mask is None else psa.BlockMask(mask)
        return dist.ring_attention(a, b, c, comm, select=select, return_stats=True, **rest)

    if masks is not None:
        per_rank.append(masks)
    results = world.run(body, *per_rank)
    return results, world


def _ring_case(world_size, dtype, seed=0, sharp=1.0, self_attention=False):
    Hq, Hkv = 4, 2
    Nq = 61 if not self_attention else 125
    Nk = Nq if self_attention else 45
    q, k, v, do = _inputs(seed + world_size, Hq, Hkv, Nq, Nk, dtype=dtype, sharp=sharp)
    return q, k, v, do, _bounds(Nq, world_size, BLOCK[0], seed), _bounds(Nk, world_size,
                                                                           BLOCK[1], seed + 9)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ring_dense_equals_single_device(world_size, dtype):
    q, k, v, _, qb, kb = _ring_case(world_size, dtype)
    options = {"block": BLOCK, "backend": BACKEND[dtype], "threads": 1}
    expected, stats = psa.attention(q, k, v, return_stats=True, **options)
    results, world = _ring(world_size, q, k, v, qb, kb, **options)
    out = _join([r[0] for r in results])
    assert out.dtype == dtype
    _assert_close(out, expected, TOL[dtype], "output")
    _assert_close(_join([r[1].lse for r in results]), stats.lse, 10 * TOL[dtype], "lse")
    for rank, (_, st) in enumerate(results):
        assert st.bounded and st.dropped_shards == ()
        assert st.transfers == world_size - 1
        assert st.kept.all() and st.density == 1.0


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ring_mask_plan_equals_single_device(world_size, dtype):
    q, k, v, _, qb, kb = _ring_case(world_size, dtype, seed=3)
    nq, nk = -(-61 // 8), -(-45 // 8)
    mask = np.random.default_rng(11).random((2, 4, nq, nk)) < 0.3
    mask[..., nk // 2] = True  # one tile every row, in some middle shard
    options = {"block": BLOCK, "backend": BACKEND[dtype], "threads": 1}
    expected, stats = psa.attention(q, k, v, select=psa.BlockMask(mask), return_stats=True,
                                    **options)
    q_tiles = [b // BLOCK[0] for b in qb[:-1]] + [nq]
    masks = [mask[:, :, a:b] for a, b in zip(q_tiles[:-1], q_tiles[1:])]
    results, _ = _ring(world_size, q, k, v, qb, kb, masks=masks, **options)
    _assert_close(_join([r[0] for r in results]), expected, TOL[dtype], "output")
    assert np.array_equal(_join([r[1].kept for r in results]), stats.kept)
    assert not any(r[1].bounded for r in results) or mask.all()


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("select", [psa.TopK(k=2), psa.TopP(0.6)], ids=["topk", "topp"])
def test_ring_global_plan_equals_single_device(world_size, select):
    q, k, v, _, qb, kb = _ring_case(world_size, np.float64, seed=5, sharp=1.5)
    options = {"block": BLOCK, "backend": "reference"}
    expected, stats = psa.attention(q, k, v, select=select, return_stats=True, **options)
    results, _ = _ring(world_size, q, k, v, qb, kb, select=select, **options)
    assert np.array_equal(_join([r[1].kept for r in results]), stats.kept)
    _assert_close(_join([r[0] for r in results]), expected, TOL[np.float64], "output")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("target", [0.8, 0.95])
def test_ring_recall_merged_bound_is_certified(world_size, target):
    q, k, v, _, qb, kb = _ring_case(world_size, np.float64, seed=7, sharp=3.0,
                                    self_attention=True)
    options = {"block": BLOCK, "backend": "reference", "skip": psa.Recall(target)}
    results, _ = _ring(world_size, q, k, v, qb, kb, **options)
    kept = _join([r[1].kept for r in results])
    bound = _join([r[1].recall_bound for r in results])
    true_recall = psa.recall(q, k, kept, block=BLOCK)
    assert bound.min() >= target
    assert np.all(bound <= true_recall + 1e-12)
    assert kept.mean() < 1.0, "the workload should let Recall skip something"
    assert all(r[1].bounded for r in results)
    # The function computed is attention restricted to the kept tiles.
    replay = psa.attention(q, k, v, select=psa.BlockMask(kept), block=BLOCK,
                           backend="reference")
    _assert_close(_join([r[0] for r in results]), replay, TOL[np.float64], "output")


def test_merge_recall_keeps_the_target():
    rng = np.random.default_rng(0)
    target = 0.9
    lse = [rng.normal(0, 3, 50) for _ in range(4)]
    lse[1][:5] = -np.inf  # rows with nothing kept in one shard
    bounds = [rng.uniform(target, 1.0, 50) for _ in range(4)]
    bounds[2][:10] = 1.0
    merged_lse, merged = dist.merge_recall(lse, bounds)
    kept = sum(np.exp(x) for x in lse)
    skipped = sum(np.exp(x) * (1 / b - 1) for x, b in zip(lse, bounds))
    np.testing.assert_allclose(merged_lse, np.log(kept), rtol=1e-13)
    np.testing.assert_allclose(merged, kept / (kept + skipped), rtol=1e-13)
    assert merged.min() >= target


def test_ring_drops_a_negligible_shard_and_its_transfer():
    # Keys of the middle shard point away from every query: its estimated mass is ~0.
    rng = np.random.default_rng(2)
    D, N = 8, 48
    direction = np.zeros(D)
    direction[0] = 1.0
    q = 5.0 * direction + 0.1 * rng.standard_normal((1, 2, N, D))
    k = 5.0 * direction + 0.1 * rng.standard_normal((1, 2, N, D))
    k[:, :, 16:32] = -5.0 * direction + 0.1 * rng.standard_normal((1, 2, 16, D))
    v = rng.standard_normal((1, 2, N, D))
    bounds = [0, 16, 32, 48]
    expected = psa.attention(q, k, v, block=BLOCK, backend="reference")
    results, world = _ring(3, q, k, v, bounds, bounds, block=BLOCK, backend="reference",
                           drop_mass=1e-3)
    for rank, (_, st) in enumerate(results):
        if rank != 1:
            assert st.dropped_shards == (1,)
            assert st.transfers == 1 and not st.bounded
            assert not st.kept[..., 2:4].any()
    # Rank 1 (the far shard's owner) sent its K/V to nobody; the others sent to two ranks each.
    assert world.comms[1].messages_sent < world.comms[0].messages_sent
    _assert_close(_join([r[0] for r in results]), expected, 1e-6, "output (dropped mass ~0)")


def test_ring_rejects_shards_that_are_not_whole_tiles():
    q, k, v, _ = _inputs(0, 2, 2, 30, 30)
    bounds = [0, 12, 30]  # 12 rows is not a whole number of 8-row tiles
    with pytest.raises(ValueError, match="multiple of the tile size"):
        _ring(2, q, k, v, bounds, bounds, block=BLOCK, backend="reference")


def test_ring_rejects_a_bad_scale():
    q, k, v, _ = _inputs(0, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="scale"):
        _ring(1, q, k, v, [0, 16], [0, 16], block=BLOCK, scale=-1.0)
    with pytest.raises(TypeError, match="scale"):
        _ring(1, q, k, v, [0, 16], [0, 16], block=BLOCK, scale="0.5")


def test_ring_bnhd_layout():
    q, k, v, _, qb, kb = _ring_case(2, np.float64, seed=1)
    expected = psa.attention(q, k, v, block=BLOCK, backend="reference")
    world = dist.LocalWorld(2)
    swap = [lambda x: x.swapaxes(1, 2)]
    outs = world.run(lambda comm, a, b, c: dist.ring_attention(
        swap[0](a), swap[0](b), swap[0](c), comm, block=BLOCK, backend="reference",
        layout="bnhd"), _split(q, qb), _split(k, kb), _split(v, kb))
    _assert_close(_join([o.swapaxes(1, 2) for o in outs]), expected, 1e-10, "output")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", ["dense", "mask", "recall"])
def test_ring_gradients_equal_single_device(world_size, case):
    q, k, v, do, qb, kb = _ring_case(world_size, np.float64, seed=13, sharp=2.0)
    nq, nk = -(-61 // 8), -(-45 // 8)
    options = {"block": BLOCK, "backend": "reference"}
    masks = None
    if case == "mask":
        mask = np.random.default_rng(3).random((2, 4, nq, nk)) < 0.4
        mask[..., 0] = True
        q_tiles = [b // BLOCK[0] for b in qb[:-1]] + [nq]
        masks = [mask[:, :, a:b] for a, b in zip(q_tiles[:-1], q_tiles[1:])]
    elif case == "recall":
        options["skip"] = psa.Recall(0.9)
    world = dist.LocalWorld(world_size)

    def body(comm, a, b, c, g, m=None):
        select = None if m is None else psa.BlockMask(m)
        out, st = dist.ring_attention(a, b, c, comm, select=select, return_stats=True,
                                      **options)
        grads = dist.ring_attention_vjp(a, b, c, g, comm, out=out, stats=st, **options)
        return st.kept, grads

    per_rank = [_split(x, b) for x, b in ((q, qb), (k, kb), (v, kb), (do, qb))]
    if masks is not None:
        per_rank.append(masks)
    results = world.run(body, *per_rank)
    kept = _join([r[0] for r in results])
    expected = psa.attention_vjp(q, k, v, do, kept=kept, **options)
    for i, name in enumerate(("dq", "dk", "dv")):
        _assert_close(_join([r[1][i] for r in results]), expected[i], 1e-10, name)


def test_ring_gradients_float32_cpu_backend():
    q, k, v, do, qb, kb = _ring_case(3, np.float32, seed=17)
    options = {"block": BLOCK, "backend": "cpu", "threads": 1}
    expected = psa.attention_vjp(q, k, v, do, **options)
    world = dist.LocalWorld(3)
    grads = world.run(lambda comm, a, b, c, g: dist.ring_attention_vjp(a, b, c, g, comm,
                                                                       **options),
                      *(_split(x, b) for x, b in ((q, qb), (k, kb), (v, kb), (do, qb))))
    for i, name in enumerate(("dq", "dk", "dv")):
        assert grads[0][i].dtype == np.float32
        _assert_close(_join([g[i] for g in grads]), expected[i], 1e-4, name)


# ----------------------------------------------------------------------------- gloo processes

def _torch_unavailable_reason():
    try:
        import torch.distributed as tdist
    except Exception as error:  # ImportError or a broken install
        return f"torch is not importable ({type(error).__name__}: {error})"
    if not tdist.is_available() or not tdist.is_gloo_available():
        return "torch.distributed or its gloo backend is not available"
    return None


def _gloo_rank(rank, world_size, init_file, arrays_file, result_dir):
    """One spawned rank: ring and Ulysses over gloo, results saved for the parent."""
    import torch.distributed as tdist

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pysparse_attn import distributed as d

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=world_size)
    try:
        data = np.load(arrays_file)
        q, k, v = (np.ascontiguousarray(data[n][:, :, 16 * rank:16 * (rank + 1)])
                   for n in "qkv")
        comm = d.TorchCommunicator()
        options = {"block": BLOCK, "backend": "cpu", "threads": 1}
        ring = d.ring_attention(q, k, v, comm, skip=psa.Recall(0.9), **options)
        ulysses = d.ulysses_attention(q, k, v, comm, **options)
        grads = d.ring_attention_vjp(q, k, v, np.ones_like(q), comm, **options)
        np.savez(os.path.join(result_dir, f"rank{rank}.npz"), ring=ring, ulysses=ulysses,
                 dq=grads[0], dk=grads[1], dv=grads[2])
    finally:
        tdist.destroy_process_group()


def test_two_processes_over_gloo(tmp_path):
    reason = _torch_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import torch.multiprocessing as mp

    q, k, v, _ = _inputs(0, 2, 2, 32, 32, sharp=2.0)
    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, q=q, k=k, v=v)
    mp.spawn(_gloo_rank, args=(2, str(tmp_path / "init"), str(arrays), str(tmp_path)),
             nprocs=2, join=True)
    parts = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    # The CPU backend accumulates in float32 (float64 in and out): 1e-5 on O(1) values.
    options = {"block": BLOCK, "backend": "cpu", "threads": 1}
    dense = psa.attention(q, k, v, **options)
    _assert_close(_join([p["ulysses"] for p in parts]), dense, 1e-12, "ulysses over gloo")
    # Recall(0.9) per row: |O - O_hat| <= 2 (1 - R) max_j |v_j| (docs/design.rst section 5).
    allowed = 2 * (1 - 0.9) * float(np.linalg.norm(v, axis=-1).max())
    _assert_close(_join([p["ring"] for p in parts]), dense, allowed, "ring (Recall) over gloo")
    expected = psa.attention_vjp(q, k, v, np.ones_like(q), **options)
    for i, name in enumerate(("dq", "dk", "dv")):
        _assert_close(_join([p[name] for p in parts]), expected[i], 1e-5, name)


def test_ulysses_bnhd_layout():
    q, k, v, _ = _inputs(4, 4, 2, 37, 37)
    expected = psa.attention(q, k, v, block=BLOCK, backend="reference")
    world = dist.LocalWorld(2)
    bounds = _bounds(37, 2, 1)
    outs = world.run(lambda comm, a, b, c: dist.ulysses_attention(
        a.swapaxes(1, 2), b.swapaxes(1, 2), c.swapaxes(1, 2), comm, block=BLOCK,
        backend="reference", layout="bnhd"), _split(q, bounds), _split(k, bounds),
        _split(v, bounds))
    _assert_close(_join([o.swapaxes(1, 2) for o in outs]), expected, 1e-12, "output")


def test_benchmark_script_runs_on_the_host(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "bench" / "distributed.py"), "--host", "--n", "256",
               "--heads", "2", "--dim", "16", "--grid", "1,16,16", "--repeats", "1",
               "--configs", "dense;recall:0.9", "--simulate", "2", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| ulysses | dense | 2 (sim) |" in done.stdout
    assert "| ring | recall:0.9 | 2 (sim) |" in done.stdout
    records = [line for f in tmp_path.glob("distributed-*.jsonl") for line in open(f)]
    assert len(records) == 4


# ----------------------------------------------------------------------------- one GPU
# Ranks as threads on one GPU (CuPy arrays, the cupy backend): the sharded paths at GPU tile
# sizes. Relative L2 tolerances: Ulysses runs the same kernel per head as one call (exact up to
# scheduling: 1e-6); the ring merges float16 partial outputs, one fp16 rounding of O per shard
# (~5e-4 each) on top of the kernel's own error: 3e-3.

def _gpu_reason():
    try:
        from pysparse_attn.backends import cupy as backend
    except Exception as error:  # the backend module itself failed
        return f"cupy backend not importable: {error}"
    return backend.unavailable_reason()


needs_gpu = pytest.mark.skipif(_gpu_reason() is not None,
                               reason=f"needs CuPy and a CUDA GPU: {_gpu_reason()}")


def _gpu_inputs(Hq=12, Hkv=6, N=337, D=64, sharp=1.0):  # groups split evenly over 1-3 ranks
    import cupy

    rng = cupy.random.default_rng(0)
    return tuple((sharp * rng.standard_normal(shape, dtype=cupy.float32)).astype(cupy.float16)
                 for shape in ((1, Hq, N, D), (1, Hkv, N, D), (1, Hkv, N, D)))


def _rel(a, b):
    import cupy

    a, b = a.astype(cupy.float32), b.astype(cupy.float32)
    return float(cupy.linalg.norm(a - b) / cupy.linalg.norm(b))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("case", ["dense", "recall", "topk"])
def test_gpu_schemes_match_one_gpu(world_size, case):
    import cupy

    q, k, v = _gpu_inputs(sharp=2.0 if case == "recall" else 1.0)
    options = {"recall": {"skip": psa.Recall(0.95)}, "topk": {"select": psa.TopK(k=2)},
               "dense": {}}[case]
    expected, stats = psa.attention(q, k, v, return_stats=True, **options)
    bounds = _bounds(337, world_size, 64)
    world = dist.LocalWorld(world_size)
    for comm in world.comms:  # bookkeeping through the device, as over NCCL
        comm.device_only = True

    def body(comm, a, b, c):
        ring = dist.ring_attention(a, b, c, comm, return_stats=True, **options)
        ulysses = dist.ulysses_attention(a, b, c, comm, return_stats=True, **options)
        return ring, ulysses

    results = world.run(body, _split(q, bounds), _split(k, bounds), _split(v, bounds))
    ring = cupy.concatenate([r[0][0] for r in results], axis=2)
    ulysses = cupy.concatenate([r[1][0] for r in results], axis=2)
    assert isinstance(ring, cupy.ndarray) and ring.dtype == q.dtype
    assert _rel(ulysses, expected) <= 1e-6
    if case == "recall":
        bound = cupy.concatenate([r[0][1].recall_bound for r in results], axis=2)
        assert float(bound.min()) >= 0.95 - 1e-6
        kept = cupy.concatenate([cupy.asarray(r[0][1].kept) for r in results], axis=2)
        replay = psa.attention(q, k, v, select=psa.BlockMask(kept))
        assert _rel(ring, replay) <= 3e-3
    else:
        assert _rel(ring, expected) <= 3e-3
    if case == "topk":
        # The ring scores pooled tiles in float32 through the generic plan builder, one GPU
        # call scores 16-bit inputs in the fused plan kernel: only near-ties may differ.
        kept = cupy.concatenate([cupy.asarray(r[0][1].kept) for r in results], axis=2)
        assert float((kept != stats.kept).mean()) <= 0.01


@pytest.mark.gpu
@needs_gpu
def test_gpu_ring_gradients_match_one_gpu():
    import cupy

    q, k, v = _gpu_inputs(Hq=2, Hkv=2, N=200)
    do = cupy.random.default_rng(1).standard_normal(q.shape, dtype=cupy.float32).astype(q.dtype)
    expected = psa.attention_vjp(q, k, v, do)
    bounds = _bounds(200, 2, 64)
    grads = dist.LocalWorld(2).run(
        lambda comm, a, b, c, g: dist.ring_attention_vjp(a, b, c, g, comm),
        *(_split(x, bounds) for x in (q, k, v, do)))
    for i, name in enumerate(("dq", "dk", "dv")):
        got = cupy.concatenate([g[i] for g in grads], axis=2)
        assert _rel(got, expected[i]) <= 1e-2, name
