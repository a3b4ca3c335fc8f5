"""Plan reuse across denoising steps (pysparse_attn.reuse) and the trajectory workloads."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pysparse_attn as psa
from pysparse_attn.reuse import PlanReuse, dilate_tiles, tile_neighbourhood
from pysparse_attn.workloads import (Trajectory, denoising_trajectory, flow_sigmas,
                                     load_trajectory)

BLOCK = (16, 16)
GRID = (3, 8, 12)  # 288 tokens, 18 key tiles of 16
BACKENDS = ["cpu", "reference"]


def fresh_seed():
    """A new seed per check (NumPy's entropy), so repeated runs cover fresh inputs."""
    return int(np.random.SeedSequence().entropy % 2**31)


def _trajectory(**kwargs):
    options = dict(shape=GRID, steps=8, heads=2, head_dim=32, seed=3, sharpness=(2.0, 4.0))
    options.update(kwargs)
    return denoising_trajectory(**options)


def _attend_plan(q, k, v, bitmap, order, skip, backend):
    """Attention over exactly the tiles of ``bitmap``: ``plan=Plan.from_kept`` (natural) or the
    builder's plan of that mask in ``order``."""
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    plan = (psa.Plan.from_kept(bitmap, block=BLOCK, order="natural", shape=shape)
            if order == "natural"
            else psa.plan(q, k, select=psa.BlockMask(bitmap), order=order, block=BLOCK))
    return psa.attention(q, k, v, plan=plan, skip=skip, backend=backend, return_stats=True)


# ---------------------------------------------------------------------------------------------
# PlanReuse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order,margin", [("natural", 0), ("natural", 1), ("peak", 1)])
def test_reused_plan_equals_attention_over_that_plan(backend, order, margin):
    trajectory = _trajectory()
    rule = psa.Recall(0.9)
    reuse = PlanReuse(rule, refresh_every=None, dense_steps=1, margin=margin, grid=GRID,
                      mass_budget=None, kept_tolerance=None, order=order, block=BLOCK)
    reused_steps = 0
    for step, (q, k, v) in enumerate(trajectory):
        stored = None
        if step > 1:
            state = reuse.state("layer")
            stored = state.plan.copy()
            reach = tile_neighbourhood(q.shape[2], BLOCK[1], margin, GRID)
            np.testing.assert_array_equal(state.plan, dilate_tiles(state.kept, reach))
        out, stats = reuse.attention(q, k, v, layer="layer", step=step, backend=backend)
        if stored is None:
            continue
        assert not stats.refreshed.any()
        expected, expected_stats = _attend_plan(q, k, v, stored, order, rule, backend)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(stats.attention.kept, expected_stats.kept)
        np.testing.assert_array_equal(stats.plan_tiles, stored.sum(axis=(2, 3)))
        np.testing.assert_array_equal(stats.kept_tiles, expected_stats.kept.sum(axis=(2, 3)))
        reused_steps += 1
    assert reused_steps == len(trajectory) - 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_steps_are_dense(backend):
    trajectory = _trajectory(steps=4)
    reuse = PlanReuse(psa.Blasst(1e-2), dense_steps=3, block=BLOCK)
    for step, (q, k, v) in enumerate(trajectory):
        out, stats = reuse.attention(q, k, v, layer=0, step=step, backend=backend)
        if step < 3:
            assert stats.dense and stats.plan_density == 1.0 and stats.kept_density == 1.0
            assert stats.attention.kept.all() and stats.attention.visited.all()
            np.testing.assert_array_equal(out, psa.attention(q, k, v, block=BLOCK,
                                                             backend=backend))
            assert reuse.layers == ()
        else:
            assert not stats.dense and stats.refreshed.all()
            assert reuse.layers == (0,)


def _jump_trajectory(jumps):
    # Global heads: each row's mass sits on a sink token; a jump redraws the sinks elsewhere.
    return denoising_trajectory(GRID, steps=8, heads=2, head_dim=32, kinds=("global",), seed=5,
                                sharpness=(1.5, 1.5), jitter=0.0, shift=1.0, jumps=jumps)


def test_guard_fires_on_a_trajectory_that_jumps():
    jump = 5
    firing = {}
    for jumps in ((), (jump,)):
        reuse = PlanReuse(psa.Recall(0.95), refresh_every=None, dense_steps=2,
                          mass_budget=0.05, kept_tolerance=None, block=BLOCK)
        fired = []
        for step, (q, k, v) in enumerate(_jump_trajectory(jumps)):
            out, stats = reuse.attention(q, k, v, layer=0, step=step, backend="cpu")
            if step >= 3:
                fired.append(bool(stats.refreshed.all()))
                assert stats.outside_growth is not None
                if not stats.refreshed.any():
                    # The reused plan is small: dropping tiles is what is being guarded.
                    assert stats.plan_density < 0.2
        firing[jumps] = fired
    steps_checked = list(range(3, 8))
    # Without the jump the structure drifts within budget: nothing fires.
    assert not any(firing[()]), dict(zip(steps_checked, firing[()]))
    # With it, the guard refreshes every head at the jump, and not before.
    assert firing[(jump,)][steps_checked.index(jump)]
    assert not any(firing[(jump,)][:steps_checked.index(jump)])


def test_kept_share_guard_acts_at_the_next_call():
    trajectory = _trajectory(steps=8, sharpness=(1.0, 6.0))
    reuse = PlanReuse(psa.Recall(0.9), refresh_every=None, dense_steps=1, mass_budget=None,
                      kept_tolerance=0.05, block=BLOCK)
    pending, fired = None, 0
    for step, (q, k, v) in enumerate(trajectory):
        out, stats = reuse.attention(q, k, v, layer=0, step=step, backend="cpu")
        if pending is not None:
            # A head flagged at the previous call refreshes now, and only flagged heads do
            # (no other guard and no schedule here).
            np.testing.assert_array_equal(stats.refreshed, pending)
            fired += int(pending.sum())
        if step >= 1:
            state = reuse.state(0)
            moved = np.abs(stats.kept_share - state.kept_share_baseline) > 0.05
            np.testing.assert_array_equal(state.pending, ~stats.refreshed & moved)
            pending = state.pending.copy()
    assert fired > 0  # the sharpening trajectory moves the kept share


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("select", [None, psa.TopK(k=6)])
def test_certificate_holds_on_the_visited_set_for_every_row(backend, select):
    trajectory = _trajectory()
    target = 0.9
    reuse = PlanReuse(psa.Recall(target), select=select, refresh_every=3, dense_steps=1,
                      margin=1, grid=GRID, block=BLOCK)
    for step, (q, k, v) in enumerate(trajectory):
        out, stats = reuse.attention(q, k, v, layer=0, step=step, backend=backend)
        visited, kept = stats.attention.visited, stats.attention.kept
        bound = np.asarray(stats.recall_bound, dtype=np.float64)
        share_of_visited = (psa.recall(q, k, kept, block=BLOCK)
                            / psa.recall(q, k, visited, block=BLOCK))
        # The bound is l / (l + u) with u an upper bound of the skipped mass: the true share is
        # at least the bound, up to the float32 rounding of l and u on the cpu backend.
        slack = 1e-12 if backend == "reference" else 2e-6
        assert (share_of_visited >= bound - slack).all(), step
        assert (bound >= target - slack).all()
        if not stats.dense and select is None:
            # Refreshed heads visited every tile: there the bound is one on the full row.
            full = psa.recall(q, k, kept, block=BLOCK)[stats.refreshed]
            assert (full >= bound[stats.refreshed] - slack).all()


def test_stats_fields_and_densities():
    trajectory = _trajectory(steps=4)
    reuse = PlanReuse(psa.Recall(0.9), dense_steps=1, refresh_every=2, block=BLOCK)
    for step, (q, k, v) in enumerate(trajectory):
        out, stats = reuse.attention(q, k, v, layer="a", step=step, backend="cpu")
        assert out.shape == q.shape and out.dtype == q.dtype
        assert stats.layer == "a" and stats.step == step
        assert stats.tiles == 18 * 18
        np.testing.assert_array_equal(stats.kept_tiles,
                                      stats.attention.kept.sum(axis=(2, 3)))
        np.testing.assert_array_equal(stats.plan_tiles,
                                      stats.attention.visited.sum(axis=(2, 3)))
        assert stats.kept_density == pytest.approx(stats.attention.density)
        if step >= 1:
            np.testing.assert_allclose(stats.kept_share, stats.kept_tiles / stats.plan_tiles)
        if step >= 2:
            assert stats.outside_mass.shape == (1, 2)
            assert ((stats.outside_mass >= -1e-12) & (stats.outside_mass <= 1 + 1e-12)).all()
    assert "PlanReuse(" in repr(reuse)


def test_layers_keep_separate_state_and_reset():
    trajectory = _trajectory(steps=3)
    reuse = PlanReuse(psa.Recall(0.9), dense_steps=0, block=BLOCK)
    q, k, v = trajectory[2]
    reuse.attention(q, k, v, layer=("cond", 0), step=0, backend="cpu")
    reuse.attention(q[:, :1], k[:, :1], v[:, :1], layer=("uncond", 0), step=0, backend="cpu")
    assert set(reuse.layers) == {("cond", 0), ("uncond", 0)}
    with pytest.raises(ValueError, match="step"):
        reuse.attention(q, k, v, layer=("cond", 0), step=0, backend="cpu")
    with pytest.raises(ValueError, match="reset"):
        reuse.attention(q[:, :1], k[:, :1], v[:, :1], layer=("cond", 0), step=1,
                        backend="cpu")
    reuse.reset(("cond", 0))
    assert reuse.layers == (("uncond", 0),)
    with pytest.raises(KeyError):
        reuse.state(("cond", 0))
    reuse.reset()
    assert reuse.layers == ()


def test_caller_arrays_are_not_written_and_layout_bnhd():
    q, k, v = _trajectory(steps=3)[2]
    copies = [x.copy() for x in (q, k, v)]
    reuse = PlanReuse(psa.Recall(0.9), dense_steps=0, block=BLOCK)
    reference = PlanReuse(psa.Recall(0.9), dense_steps=0, block=BLOCK)
    out, _ = reuse.attention(q, k, v, layer=0, step=0, backend="cpu")
    out_t, _ = reference.attention(*(x.swapaxes(1, 2) for x in (q, k, v)), layer=0, step=0,
                                   backend="cpu", layout="bnhd")
    np.testing.assert_array_equal(out_t.swapaxes(1, 2), out)
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(skip=None), ValueError, "skip rule or a selector"),
    (dict(skip="recall"), TypeError, "skip"),
    (dict(skip=psa.Recall(0.9), select=psa.BlockMask(np.ones((1, 1, 1, 1), bool))), TypeError,
     "select"),
    (dict(skip=psa.Recall(0.9), refresh_every=0), ValueError, "refresh_every"),
    (dict(skip=psa.Recall(0.9), dense_steps=-1), ValueError, "dense_steps"),
    (dict(skip=psa.Recall(0.9), margin=1.5), TypeError, "margin"),
    (dict(skip=psa.Recall(0.9), mass_budget=2.0), ValueError, "mass_budget"),
    (dict(skip=psa.Recall(0.9), kept_tolerance=-0.1), ValueError, "kept_tolerance"),
    (dict(skip=psa.Recall(0.9), order="random"), ValueError, "order"),
    (dict(skip=psa.Recall(0.9), grid=(2, 3)), ValueError, "grid"),
])
def test_bad_arguments(kwargs, error, match):
    skip = kwargs.pop("skip")
    with pytest.raises(error, match=match):
        PlanReuse(skip, **kwargs)


def test_bad_call_arguments():
    q, k, v = _trajectory(steps=1)[0]
    reuse = PlanReuse(psa.Recall(0.9), dense_steps=0, margin=1, grid=(2, 8, 12), block=BLOCK)
    with pytest.raises(ValueError, match="step"):
        reuse.attention(q, k, v, layer=0, step=-1)
    with pytest.raises(TypeError, match="layer"):
        reuse.attention(q, k, v, layer=[0], step=0)
    with pytest.raises(ValueError, match="grid"):
        reuse.attention(q, k, v, layer=0, step=0, backend="cpu")


def test_tile_neighbourhood():
    band = tile_neighbourhood(100, 10, 2)
    assert band.shape == (10, 10) and band[0, 2] and not band[0, 3]
    np.testing.assert_array_equal(tile_neighbourhood(100, 10, 0), np.eye(10, dtype=bool))
    # Grid (2, 4, 8), tiles of 8 tokens = one image row: tile (t, y) neighbours the rows above
    # and below and the same rows of the other frame, not rows two apart.
    reach = tile_neighbourhood(64, 8, 1, grid=(2, 4, 8))
    assert (reach == reach.T).all()
    assert reach[1, 0] and reach[1, 2] and reach[1, 5] and reach[1, 4] and not reach[1, 3]
    assert not reach[0, 7]
    assert tile_neighbourhood(64, 8, 3, grid=(2, 4, 8)).all()
    with pytest.raises(ValueError, match="grid"):
        tile_neighbourhood(60, 8, 1, grid=(2, 4, 8))
    kept = np.zeros((1, 1, 2, 8), dtype=bool)
    kept[0, 0, 1, 1] = True
    dilated = dilate_tiles(kept, reach)
    np.testing.assert_array_equal(dilated[0, 0, 1], reach[1])
    assert not dilated[0, 0, 0].any()


@pytest.mark.gpu
def test_plan_reuse_on_gpu_matches_cpu():
    import cupy

    reuse_gpu = PlanReuse(psa.Recall(0.9), refresh_every=3, dense_steps=1, block=(64, 64))
    reuse_cpu = PlanReuse(psa.Recall(0.9), refresh_every=3, dense_steps=1, block=(64, 64))
    trajectory = denoising_trajectory((3, 16, 32), steps=6, heads=2, head_dim=64,
                                      dtype="bfloat16", seed=1)
    for step, (q, k, v) in enumerate(trajectory):
        out_gpu, stats_gpu = reuse_gpu.attention(*(cupy.asarray(x) for x in (q, k, v)),
                                                 layer=0, step=step, check_finite=False)
        assert isinstance(out_gpu, cupy.ndarray) and isinstance(stats_gpu.refreshed,
                                                                cupy.ndarray)
        out_cpu, stats_cpu = reuse_cpu.attention(q, k, v, layer=0, step=step, backend="cpu")
        # Both ran the rule on their own kept sets; compare each with exact attention instead.
        exact = psa.attention(*(x.astype(np.float64) for x in (q, k, v)), block=(64, 64),
                              backend="reference")
        for out in (out_gpu.get(), out_cpu):
            error = np.linalg.norm(out.astype(np.float64) - exact) / np.linalg.norm(exact)
            assert error < 0.03


# ---------------------------------------------------------------------------------------------
# Trajectory workloads


def test_trajectory_is_deterministic_in_any_access_order():
    a = _trajectory(jumps=(4,))
    b = _trajectory(jumps=(4,))
    later = b[6]
    for x, y in zip(a[6], later):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a[2], b[2]):
        np.testing.assert_array_equal(x, y)
    assert len(a) == 8 and isinstance(a, Trajectory)
    assert a[-1][0].shape == (1, 2, 288, 32) and a[0][0].dtype == np.float32
    assert not np.array_equal(_trajectory(seed=4)[3][0], a[3][0])
    with pytest.raises(IndexError):
        a[8]


def test_trajectory_goes_from_noise_to_structure():
    trajectory = _trajectory(steps=10, kinds=("local",))
    top_share = []
    for q, k, v in (trajectory[0], trajectory[9]):
        kept = psa.attention(q, k, v, select=psa.TopK(ratio=0.2), block=BLOCK,
                             return_stats=True)[1].kept
        top_share.append(psa.recall(q, k, kept, block=BLOCK).mean())
    # Noise-dominated rows are near uniform: a fifth of the tiles holds about a fifth of the
    # mass; at the end the structure puts most of it there.
    assert top_share[0] < 0.35 < 0.7 < top_share[1]
    np.testing.assert_allclose(trajectory.sigmas, flow_sigmas(10))
    assert trajectory.grid == GRID and trajectory.description["steps"] == 10


def test_trajectory_drifts_between_steps_and_jumps_change_more():
    def tile_mass(q, k):
        return psa.recall(q, k, np.eye(18, dtype=bool)[None, None].repeat(2, 1), block=BLOCK)

    def change(trajectory, step):
        return np.abs(tile_mass(*trajectory[step][:2]) - tile_mass(*trajectory[step - 1][:2]))

    smooth = _trajectory(kinds=("global",), jitter=0.0)
    jumping = _trajectory(kinds=("global",), jitter=0.0, jumps=(6,))
    assert change(smooth, 6).mean() > 0  # drift: steps differ
    assert change(jumping, 6).mean() > 5 * change(smooth, 6).mean()
    for x, y in zip(smooth[5], jumping[5]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kwargs,error", [
    (dict(steps=0), ValueError), (dict(shift=0.0), ValueError),
    (dict(sharpness=(1.0, -1.0)), ValueError), (dict(motion=(1.0, 2.0, 3.0)), ValueError),
    (dict(jitter=-1.0), ValueError), (dict(jumps=(0,)), ValueError),
    (dict(noise_power="a"), TypeError), (dict(seed=-1), ValueError), (dict(seed=1.5), TypeError),
])
def test_trajectory_bad_arguments(kwargs, error):
    with pytest.raises(error):
        _trajectory(**kwargs)


def test_load_trajectory_round_trip(tmp_path):
    trajectory = _trajectory(steps=3)
    for step in (2, 0, 1):  # written out of order; read back in natural order of the names
        q, k, v = trajectory[step]
        if step == 1:
            np.save(tmp_path / "step_1.npy", np.stack([q, k, v]))
        else:
            np.savez(tmp_path / f"step_{step}.npz", q=q, k=k, v=v)
    step_dir = tmp_path / "step_10"
    step_dir.mkdir()
    for name, x in zip("qkv", trajectory[2]):
        np.save(step_dir / f"{name}.npy", x)
    (tmp_path / "README").write_text("not a step")
    loaded = load_trajectory(tmp_path, grid=GRID, sigmas=[1.0, 0.5, 0.2, 0.1])
    assert loaded.description["files"] == ["step_0.npz", "step_1.npy", "step_2.npz", "step_10"]
    assert len(loaded) == 4 and loaded.grid == GRID
    for step, expected in ((0, 0), (1, 1), (2, 2), (3, 2)):
        for x, y in zip(loaded[step], trajectory[expected]):
            np.testing.assert_array_equal(x, y)


def test_load_trajectory_reads_grid_and_sigmas_files_unless_given(tmp_path):
    trajectory = _trajectory(steps=2)
    for step, (q, k, v) in enumerate(trajectory):
        np.savez(tmp_path / f"step_{step:03d}.npz", q=q, k=k, v=v)
    np.save(tmp_path / "grid.npy", np.array(GRID))
    np.save(tmp_path / "sigmas.npy", np.array([1.0, 0.5]))
    loaded = load_trajectory(tmp_path)
    assert len(loaded) == 2 and loaded.grid == GRID
    assert loaded.description["grid"] == list(GRID)
    np.testing.assert_array_equal(loaded.sigmas, [1.0, 0.5])
    given = load_trajectory(tmp_path, grid=(1, 1, 288), sigmas=[0.9, 0.1])
    assert given.grid == (1, 1, 288)
    np.testing.assert_array_equal(given.sigmas, [0.9, 0.1])
    np.save(tmp_path / "sigmas.npy", np.array([1.0]))
    with pytest.raises(ValueError, match="sigmas"):
        load_trajectory(tmp_path)


def test_load_trajectory_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_trajectory(tmp_path / "missing")
    with pytest.raises(ValueError, match="no per-step"):
        load_trajectory(tmp_path)
    x = np.zeros((1, 2, 24, 8), dtype=np.float32)
    np.savez(tmp_path / "step_0.npz", q=x, k=x, v=x)
    np.savez(tmp_path / "step_1.npz", q=x[:, :, :16], k=x[:, :, :16], v=x[:, :, :16])
    with pytest.raises(ValueError, match="sigmas"):
        load_trajectory(tmp_path, sigmas=[1.0])
    loaded = load_trajectory(tmp_path)
    loaded[0]
    with pytest.raises(ValueError, match="step_1.npz"):
        loaded[1]
    with pytest.raises(ValueError, match="grid"):
        load_trajectory(tmp_path, grid=(2, 3, 5))[0]


def test_bench_reuse_cli_writes_table_records_and_plot(tmp_path):
    from pysparse_attn.bench.__main__ import main

    prefix = tmp_path / "reuse-cpu-test"
    assert main(["reuse", "-o", str(prefix), "--shape", "3x8x12", "--heads", "2",
                 "--head-dim", "32", "--steps", "4", "--block", "16x16", "--repeat", "1",
                 "--dense-steps", "1", "--refresh-every", "2", "--mass-budget", "1",
                 "--kept-tolerance", "1"]) == 0
    lines = [json.loads(line) for line in prefix.with_suffix(".jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "environment" and lines[-1]["type"] == "summary"
    steps = [r for r in lines if r["type"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert steps[0]["dense_step"] and steps[0]["rel_l2"] < 1e-6
    assert steps[1]["refreshed_heads"] == 2 and steps[3]["refreshed_heads"] == 2
    assert all(r["recall_bound_min"] >= 0.95 - 1e-6 for r in steps)
    assert lines[-1]["steps"] == 4 and lines[-1]["head_refreshes"] == 4
    table = prefix.with_suffix(".md").read_text()
    assert "| 3 |" in table and "speedup vs dense" in table
    assert prefix.with_suffix(".png").stat().st_size > 0
    assert prefix.with_suffix(".svg").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# The plan of a reused step, and forks


def _check_reused_plan_order(trajectory, order, block, to_device=lambda x: x):
    reuse = PlanReuse(psa.Recall(0.9), refresh_every=4, dense_steps=0, block=block,
                      order=order, peak=2, mass_budget=None, kept_tolerance=None)
    start = len(trajectory) - 2
    reuse.attention(*(to_device(x) for x in trajectory[start]), layer=0, step=start)
    bitmap = reuse.state(0).plan
    assert not bool(bitmap.all()), "the test needs a plan that dropped tiles"
    q, k, v = (to_device(x) for x in trajectory[start + 1])
    _, stats = reuse.attention(q, k, v, layer=0, step=start + 1)
    assert not bool(stats.refreshed.any())
    ours = stats.attention.plan
    public = psa.plan(q, k, select=psa.BlockMask(bitmap), order=order, peak=2, block=block)
    for name in ("row_offsets", "row_indices"):
        np.testing.assert_array_equal(_host(getattr(ours, name)), _host(getattr(public, name)))
    assert ours.order == order and ours.shape == public.shape


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


@pytest.mark.parametrize("order", ["peak", "score"])
def test_reused_plan_orders_tiles_as_the_public_builder_does(order):
    _check_reused_plan_order(_trajectory(), order, BLOCK)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["peak", "score"])
def test_reused_plan_on_gpu_orders_tiles_as_the_public_builder_does(order):
    """The reused plan comes from the fused GPU builder (its scores, the mask path of its
    selection kernel) and equals the public BlockMask plan exactly."""
    import cupy

    trajectory = denoising_trajectory((3, 16, 32), steps=8, heads=2, head_dim=64,
                                      dtype="bfloat16", seed=2, sharpness=(2.0, 4.0))
    _check_reused_plan_order(trajectory, order, (64, 64), cupy.asarray)


def test_a_fork_continues_from_the_state_and_leaves_the_original_untouched():
    trajectory = _trajectory()
    reuse = PlanReuse(psa.Recall(0.9), refresh_every=3, dense_steps=1, block=(16, 16))
    for step in range(3):
        reuse.attention(*trajectory[step], layer=0, step=step)
    before = reuse.state(0)
    twin = reuse.fork()
    out_twin, stats_twin = twin.attention(*trajectory[3], layer=0, step=3)
    assert reuse.state(0) is before and twin.state(0) is not before
    out, stats = reuse.attention(*trajectory[3], layer=0, step=3)  # still allowed: untouched
    np.testing.assert_array_equal(out, out_twin)
    np.testing.assert_array_equal(stats.attention.kept, stats_twin.attention.kept)
    assert repr(twin) == repr(reuse)


# ---------------------------------------------------------------------------------------------
# The benchmark: variants, timing


def test_variants_parse_and_bad_ones_name_the_problem():
    from pysparse_attn.bench.reuse import parse_variant

    assert parse_variant("r80:skip=recall:0.8,margin=1,mass-budget=none") == (
        "r80", {"skip": "recall:0.8", "margin": 1, "mass_budget": None})
    assert parse_variant("plain") == ("plain", {})
    for text, match in [("bad label:margin=1", "label"), ("x:colour=red", "colour"),
                        ("x:margin=one", "margin"), ("x:margin", "key=value")]:
        with pytest.raises(ValueError, match=match):
            parse_variant(text)


def test_bench_reuse_variants_share_the_trajectory_and_write_each_one(tmp_path, capsys):
    from pysparse_attn.bench.__main__ import main

    prefix = tmp_path / "reuse"
    assert main(["reuse", "-o", str(prefix), "--shape", "3x8x12", "--heads", "2",
                 "--head-dim", "32", "--steps", "5", "--block", "16x16", "--repeat", "2",
                 "--dense-steps", "1", "--refresh-every", "2", "--variant", "base",
                 "--variant", "late:dense-steps=3,skip=recall:0.8,order=natural,"
                 "refresh-every=none"]) == 0
    runs = {}
    for label in ("base", "late"):
        lines = [json.loads(x) for x in (tmp_path / f"reuse-{label}.jsonl").read_text()
                 .splitlines()]
        assert lines[0]["variant"] == label and lines[-1]["type"] == "summary"
        runs[label] = [r for r in lines if r["type"] == "step"]
        assert (tmp_path / f"reuse-{label}.png").stat().st_size > 0
    # One dense and one rule-alone figure per step, shared by the variants.
    for a, b in zip(runs["base"], runs["late"]):
        assert a["time_dense_s"] == b["time_dense_s"] and a["time_rule_s"] == b["time_rule_s"]
        assert a["host_reuse_s"] > 0 and a["time_plan_only_s"] > 0
    assert [r["dense_step"] for r in runs["late"]] == [True, True, True, False, False]
    assert runs["late"][3]["refreshed_heads"] == 2 and runs["late"][4]["refreshed_heads"] == 0
    assert all(r["rel_l2"] < 1e-6 for r in runs["late"][:3])  # dense steps are exact
    assert runs["late"][4]["recall_bound_min"] >= 0.8 - 1e-6
    table = (tmp_path / "reuse-variants.md").read_text()
    assert "| base |" in table and "| late |" in table and "recall:0.8" in table
    assert main(["reuse", "-o", str(tmp_path / "twice"), "--variant", "a", "--variant", "a"]) == 2
    assert "labels must differ" in capsys.readouterr().err


def test_time_rounds_reports_medians_results_and_host_times():
    from pysparse_attn.bench.timing import time_rounds

    calls = []
    seconds, results, host = time_rounds(
        [lambda: calls.append("a") or "a", [lambda i=i: i for i in range(4)]], 3, "cpu")
    assert results == ["a", 3] and calls == ["a"] * 4  # one warm-up call, three rounds
    assert len(seconds) == len(host) == 2 and all(s >= 0 for s in seconds)
    with pytest.raises(ValueError, match="needs 4"):
        time_rounds([[lambda: 0] * 3], 3, "cpu")
    with pytest.raises(ValueError, match="rounds"):
        time_rounds([lambda: 0], 0, "cpu")


@pytest.mark.gpu
def test_time_rounds_on_the_gpu_times_queued_calls_by_events():
    import cupy

    from pysparse_attn.bench.timing import time_rounds

    x = cupy.ones((2048, 2048), dtype=cupy.float32)
    (big, small), (y, _), host = time_rounds([lambda: x @ x @ x, lambda: x + 1], 3, "cupy",
                                             calls=2)
    assert isinstance(y, cupy.ndarray) and float(y[0, 0]) == 2048.0 ** 2
    assert big > small > 0, (big, small)
    assert all(h < 0.5 for h in host)  # issuing a call never waited for the device


@pytest.mark.gpu
def test_bench_reuse_on_the_gpu_runs_variants_with_device_references(tmp_path):
    from pysparse_attn.bench.__main__ import main

    prefix = tmp_path / "reuse-gpu"
    assert main(["reuse", "-o", str(prefix), "--backend", "cupy", "--dtype", "bfloat16",
                 "--shape", "3x16x32", "--heads", "2", "--head-dim", "64", "--steps", "4",
                 "--block", "128x64", "--repeat", "2", "--dense-steps", "1",
                 "--refresh-every", "2", "--error-tiles", "2",
                 "--variant", "peak", "--variant", "natural:order=natural,margin=1",
                 "--variant", "plain:mass-budget=none,kept-tolerance=none,rule-in-plan=false"]
                ) == 0
    for label in ("peak", "natural", "plain"):
        lines = [json.loads(x) for x in (tmp_path / f"reuse-gpu-{label}.jsonl").read_text()
                 .splitlines()]
        assert lines[0]["backend"] == "cupy" and lines[0]["dtype"] == "bfloat16"
        steps = [r for r in lines if r["type"] == "step"]
        assert len(steps) == 4 and steps[0]["dense_step"]
        for r in steps:
            # bf16 rounding alone is ~4e-3; the noise-dominated first steps have small outputs
            assert 0 < r["time_reuse_s"] < 1 and r["rel_l2"] < 0.05, r
            assert r["recall_bound_min"] >= 0.95 - 1e-3 and r["recall_min"] > 0.9, r
            assert r["error_rows"] == 256 and 0 < r["host_reuse_s"] < 1, r


def test_prefetched_steps_come_in_order_and_errors_reach_the_caller():
    from pysparse_attn.bench.reuse import _Prefetcher

    made = []

    class Steps:
        def __len__(self):
            return 4

        def __getitem__(self, step):
            made.append(step)
            if step == 3:
                raise ValueError("step 3 is unreadable")
            return (step,)

    ahead = _Prefetcher(Steps(), ahead=True)
    assert [ahead(s) for s in range(3)] == [(0,), (1,), (2,)]
    with pytest.raises(ValueError, match="step 3"):
        ahead(3)
    assert made == [0, 1, 2, 3]


def test_without_the_rule_in_plan_reused_steps_visit_their_plan_with_no_rule():
    trajectory = _trajectory()
    rule = psa.Recall(0.9)
    reuse = PlanReuse(rule, refresh_every=3, dense_steps=1, block=(16, 16), mass_budget=None,
                      kept_tolerance=None, rule_in_plan=False)
    plain_plan = None
    for step, (q, k, v) in enumerate(trajectory):
        plan_before = None if step < 2 else reuse.state(0).plan
        out, stats = reuse.attention(q, k, v, layer=0, step=step)
        if step == 0:
            assert stats.dense
            continue
        refreshing = (step - 1) % 3 == 0  # first plan step 1, then every 3 steps
        assert bool(stats.refreshed.all()) == refreshing and (
            refreshing or not stats.refreshed.any()), step
        if refreshing:  # the rule ran over every tile
            assert stats.kept_density < 1.0 and stats.recall_bound.min() >= 0.9 - 1e-6
            plain_plan = None
            continue
        # The steps after the first between two refreshes attend with the plan it built.
        if plain_plan is not None:
            assert stats.attention.plan is plain_plan, step
        plain_plan = stats.attention.plan
        assert reuse.state(0).reused_plan is plain_plan
        # Between refreshes: every plan tile kept, and exactly attention on the stored plan.
        np.testing.assert_array_equal(stats.attention.kept, plan_before)
        assert stats.recall_bound.min() == 1.0
        expected = psa.attention(q, k, v, plan=psa.Plan.from_kept(
            plan_before, block=(16, 16), order="natural", shape=stats.attention.plan.shape))
        np.testing.assert_array_equal(out, expected)
    assert "rule_in_plan=False" in repr(reuse)


def test_without_the_rule_in_plan_and_no_schedule_the_first_plan_is_kept():
    trajectory = _trajectory()
    reuse = PlanReuse(psa.Recall(0.9), refresh_every=None, dense_steps=0, block=(16, 16),
                      mass_budget=None, kept_tolerance=None, rule_in_plan=False)
    start = len(trajectory) - 4  # structure-dominated steps, where the rule skips
    _, first = reuse.attention(*trajectory[start], layer=0, step=start)
    assert first.refreshed.all() and first.kept_density < 1.0
    for step in range(start + 1, len(trajectory)):
        _, stats = reuse.attention(*trajectory[step], layer=0, step=step)
        assert not stats.refreshed.any() and stats.recall_bound.min() == 1.0
        np.testing.assert_array_equal(stats.attention.kept, first.attention.kept)


def test_rule_in_plan_off_needs_host_known_refreshes():
    with pytest.raises(ValueError, match="mass_budget=None and kept_tolerance=None"):
        PlanReuse(psa.Recall(0.9), rule_in_plan=False)
    with pytest.raises(ValueError, match="kept_tolerance"):
        PlanReuse(psa.Recall(0.9), mass_budget=None, rule_in_plan=False)
    with pytest.raises(TypeError, match="rule_in_plan"):
        PlanReuse(psa.Recall(0.9), rule_in_plan="no")


def test_bench_reuse_variant_without_the_rule_in_plan(tmp_path):
    from pysparse_attn.bench.__main__ import main

    prefix = tmp_path / "reuse"
    assert main(["reuse", "-o", str(prefix), "--shape", "3x8x12", "--heads", "2",
                 "--head-dim", "32", "--steps", "5", "--block", "16x16", "--repeat", "1",
                 "--dense-steps", "1", "--refresh-every", "3", "--variant",
                 "plain:mass-budget=none,kept-tolerance=none,rule-in-plan=false"]) == 0
    steps = [json.loads(x) for x in (tmp_path / "reuse-plain.jsonl").read_text().splitlines()
             if '"step"' in x and '"type": "step"' in x]
    reused = [r for r in steps if not r["dense_step"] and r["refreshed_heads"] == 0]
    assert [r["step"] for r in reused] == [2, 3]
    for r in reused:
        assert r["kept_density"] == r["plan_density"] and r["recall_bound_min"] == 1.0


def test_bench_reuse_variant_refreshing_over_a_selector_plan(tmp_path):
    from pysparse_attn.bench.__main__ import main

    prefix = tmp_path / "reuse"
    assert main(["reuse", "-o", str(prefix), "--shape", "3x8x12", "--heads", "2",
                 "--head-dim", "32", "--steps", "5", "--block", "16x16", "--repeat", "1",
                 "--dense-steps", "1", "--refresh-every", "3", "--variant",
                 "topk:select=topk:0.5,mass-budget=none,kept-tolerance=none,rule-in-plan=false",
                 "--variant", "full:select=none"]) == 0
    records = [json.loads(x) for x in (tmp_path / "reuse-topk.jsonl").read_text().splitlines()]
    assert "select=TopK(" in records[0]["reuse"]
    steps = [r for r in records if r["type"] == "step"]
    refreshes = [r for r in steps if not r["dense_step"] and r["refreshed_heads"]]
    assert [r["step"] for r in refreshes] == [1, 4]
    for r in steps[1:]:  # every plan lies inside TopK(0.5)'s: 9 of the 18 key tiles a row
        assert r["plan_density"] <= 0.5 + 1e-9 and r["kept_density"] <= r["plan_density"]
    full = [json.loads(x) for x in (tmp_path / "reuse-full.jsonl").read_text().splitlines()]
    assert "select=None" in full[0]["reuse"]


def test_bench_reuse_selector_settings_are_checked_before_any_work():
    from pysparse_attn.bench.reuse import parse_select

    assert parse_select("none") is None and parse_select("topp:0.9") == psa.TopP(0.9)
    assert parse_select("topk:0.25") == psa.TopK(ratio=0.25)
    for bad in ("topk", "top:0.5", "topp:x", "topp:1.5"):
        with pytest.raises(ValueError, match="--select"):
            parse_select(bad)
