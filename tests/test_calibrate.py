"""Calibration returns thresholds that reach their targets in the library's own forward pass."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

import pysparse_attn as psa
from pysparse_attn._plan import build_plan
from pysparse_attn._reference import decision_slack
from pysparse_attn._rules import Blasst
from pysparse_attn.calibrate import (blasst_statistics, calibrate_blasst, calibrate_cef,
                                     calibrate_recall)
from pysparse_attn.workloads import video_qkv


def fresh_seed():
    return int(np.random.SeedSequence().entropy % 2**31)


def workload(seed, grid=(3, 7, 9), heads=2, head_dim=16, dtype=np.float64):
    """Odd sizes: 189 tokens, so 16-wide tiles leave a partial last tile."""
    q, k, v = video_qkv(grid, heads=heads, head_dim=head_dim, kinds=("local", "temporal"),
                        seed=seed, sharpness=2.0, dtype=dtype)
    for x in (q, k, v):
        x.setflags(write=False)  # calibration must never write into the caller's arrays
    return q, k, v


@pytest.mark.parametrize("order", ["natural", "score", "peak"])
def test_blasst_statistics_match_the_reference_replay(order):
    """g of the one dense pass equals the reference tile loop's decision margin at lam = 1."""
    seed = fresh_seed()
    q, k, v = workload(seed)
    block = (16, 16)
    stat = blasst_statistics(q, k, order=order, block=block)
    plan = build_plan(np, q, k, None, order, 4, block, 0.25)
    kept = np.ones(stat.shape, dtype=bool)
    slack = decision_slack(q, k, v, plan, kept, Blasst(1.0), 0.25)  # param = ln(1) = 0
    decided = np.isfinite(slack)
    assert np.array_equal(decided, np.isfinite(stat)), f"seed={seed}"
    # float64 both ways; only summation order differs.
    np.testing.assert_allclose(stat[decided], -slack[decided], atol=1e-10,
                               err_msg=f"seed={seed}")


@pytest.mark.parametrize("order", ["natural", "peak"])
def test_blasst_thresholds_hit_their_targets_on_the_reference(order):
    seed = fresh_seed()
    q, k, v = workload(seed)
    targets = [0.05, 0.2, 0.35]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a target above the reachable range is tested below
        calibration = calibrate_blasst(q, k, targets, order=order, block=(16, 16))
    for rule, achieved, target in zip(calibration.rules(), calibration.achieved, targets):
        _, stats = psa.attention(q, k, v, skip=rule, order=order, block=(16, 16),
                                 backend="reference", return_stats=True)
        assert stats.sparsity == pytest.approx(achieved, abs=1e-12), f"seed={seed}"
        if target <= calibration.max_sparsity:
            # at most one tile's share above the target (the curve is a step function)
            assert target <= achieved <= target + 1.0 / stats.kept.size + 1e-12, f"seed={seed}"


def test_blasst_thresholds_transfer_to_the_cpu_backend():
    from pysparse_attn import backends

    try:
        backends.load("cpu")
    except ValueError as error:
        pytest.skip(f"CPU backend not built here: {error}")
    seed = fresh_seed()
    q, k, v = workload(seed, grid=(4, 9, 13), dtype=np.float32)
    calibration = calibrate_blasst(q, k, [0.1, 0.3], block=(32, 32))
    for rule, achieved in zip(calibration.rules(), calibration.achieved):
        _, stats = psa.attention(q, k, v, skip=rule, block=(32, 32), backend="cpu",
                                 return_stats=True)
        # float32 logits may flip a decision whose statistic sits within rounding of lam.
        assert abs(stats.sparsity - achieved) <= 2.0 / stats.kept.size, f"seed={seed}"


def test_blasst_warns_and_clips_above_the_reachable_sparsity():
    q, k, _ = workload(fresh_seed())
    with pytest.warns(UserWarning, match="above the largest"):
        calibration = calibrate_blasst(q, k, [0.1, 0.999], block=(16, 16))
    assert calibration.lam[1] == 1.0
    assert calibration.achieved[1] == pytest.approx(calibration.max_sparsity)


def test_blasst_fit_is_an_increasing_exponential():
    seed = fresh_seed()
    q, k, _ = workload(seed, grid=(4, 12, 16), head_dim=32)
    calibration = calibrate_blasst(q, k, 0.2, block=(16, 16))
    assert calibration.a > 0 and calibration.b > 0, f"seed={seed}"
    assert math.isfinite(calibration.a) and math.isfinite(calibration.b)
    low, high = calibration.predict([0.05, 0.3])
    assert 0 < low < high <= 1
    # Transfer: at twice the keys the same sparsity needs half the lam (the model's 1/Nk).
    assert calibration.predict(0.05, 2 * calibration.n_keys) == pytest.approx(low / 2)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), [[0.1]], []])
def test_targets_are_validated(bad):
    q, k, _ = workload(fresh_seed())
    with pytest.raises(ValueError, match="target_sparsity"):
        calibrate_blasst(q, k, bad, block=(16, 16))
    with pytest.raises(ValueError, match="target_sparsity"):
        calibrate_cef(q, k, bad, block=(16, 16), backend="reference")


def test_other_arguments_are_validated():
    q, k, _ = workload(fresh_seed())
    with pytest.raises(ValueError, match="order"):
        calibrate_blasst(q, k, 0.1, order="random")
    with pytest.raises(ValueError, match="peak"):
        calibrate_blasst(q, k, 0.1, peak=-1)
    with pytest.raises(ValueError, match="refine"):
        calibrate_cef(q, k, 0.1, refine=-1)
    with pytest.raises(ValueError, match="grid"):
        calibrate_cef(q, k, 0.1, grid=[-1.0, 0.5])
    with pytest.raises(ValueError, match="head dim"):
        calibrate_blasst(q, k[:, :, :, :3], 0.1)


def test_cef_replay_hits_its_targets():
    seed = fresh_seed()
    q, k, v = workload(seed)
    targets = [0.1, 0.3]
    calibration = calibrate_cef(q, k, targets, block=(16, 16), backend="reference", refine=10)
    for rule, achieved, target, mass in zip(calibration.rules(), calibration.achieved, targets,
                                            calibration.mass):
        _, stats = psa.attention(q, k, v, skip=rule, block=(16, 16), backend="reference",
                                 return_stats=True)
        assert stats.sparsity == pytest.approx(achieved, abs=1e-12), f"seed={seed}"
        assert achieved >= target - 1e-12, f"seed={seed}"
        # mass is the same threshold in Cef.from_mass units.
        n_keys = k.shape[2]
        assert psa.Cef.from_mass(min(mass, 1.0), 16, n_keys).lam == pytest.approx(rule.lam)
    low, high = calibration.observed_range
    assert 0.0 <= low <= high <= 1.0


def test_cef_warns_outside_the_observed_range():
    q, k, _ = workload(fresh_seed())
    grid = [-40.0, -39.0]  # so far below any logit gap that nothing is ever skipped
    with pytest.warns(UserWarning, match="outside the range"):
        calibration = calibrate_cef(q, k, 0.5, block=(16, 16), backend="reference", grid=grid,
                                    refine=0)
    assert calibration.achieved[0] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# One layer budget, per-head parameters


def mixed_workload(seed, dtype=np.float64):
    """Four heads of different kinds: the budget is worth spending unevenly across them."""
    q, k, v = video_qkv((3, 7, 9), heads=4, head_dim=16,
                        kinds=("local", "temporal", "global", "diffuse"), seed=seed,
                        sharpness=2.0, dtype=dtype)
    for x in (q, k, v):
        x.setflags(write=False)
    return q, k, v


def run_heads_alone(calibration, q, k, v, block, backend="reference"):
    """Each head alone with its own scalar parameter, outputs and kept sets stacked."""
    outs, kept = [], []
    for h, rule in enumerate(calibration.head_rules()):
        out, stats = psa.attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], skip=rule,
                                   block=block, backend=backend, return_stats=True)
        outs.append(out)
        kept.append(stats.kept)
    return np.concatenate(outs, axis=1), np.concatenate(kept, axis=1)


CALIBRATORS = {
    "blasst": (calibrate_blasst, {}),
    "cef": (calibrate_cef, {"backend": "reference", "refine": 3}),
    "recall": (calibrate_recall, {"backend": "reference", "refine": 3}),
}


@pytest.mark.parametrize("name", list(CALIBRATORS))
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("budget", [("max_error", 0.02), ("min_recall", 0.99)])
def test_budget_is_met_and_reported_exactly(name, per_head, budget):
    """The calibrated error, recall and sparsity are those of an independent run."""
    seed = fresh_seed()
    q, k, v = mixed_workload(seed)
    block = (16, 16)
    calibrate, options = CALIBRATORS[name]
    calibration = calibrate(q, k, v=v, per_head=per_head, block=block, **{budget[0]: budget[1]},
                            **options)
    H = q.shape[1]
    assert calibration.met, f"seed={seed}"
    assert calibration.params.shape == (H,)
    field = "target" if name == "recall" else "lam"
    parameter = getattr(calibration.rule, field)
    if per_head:
        assert isinstance(parameter, np.ndarray) and parameter.shape == (H,)
        np.testing.assert_array_equal(parameter, calibration.params)
    else:
        assert isinstance(parameter, float)
        assert (calibration.params == parameter).all()
    out, kept = run_heads_alone(calibration, q, k, v, block)
    dense = psa.attention(q, k, v, block=block, backend="reference")
    error = np.linalg.norm(out - dense) / np.linalg.norm(dense)
    true_recall = psa.recall(q, k, kept, block=block).mean()
    # float64 on both sides; they differ only in summation order.
    assert calibration.sparsity == pytest.approx(1.0 - kept.mean(), abs=1e-12), f"seed={seed}"
    assert calibration.recall == pytest.approx(true_recall, abs=1e-10), f"seed={seed}"
    np.testing.assert_allclose(calibration.head_sparsity, 1.0 - kept.mean(axis=(0, 2, 3)),
                               atol=1e-12)
    if budget[0] == "max_error":
        assert calibration.error == pytest.approx(error, rel=1e-8, abs=1e-12), f"seed={seed}"
        assert error <= budget[1] * (1 + 1e-9), f"seed={seed}"
    else:
        assert true_recall >= budget[1] - 1e-10, f"seed={seed}"
    assert calibration.curve_sparsity.shape == (H, calibration.grid.size)


@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_a_budget_skips_something_on_mixed_heads(name):
    """Guards the budget tests against vacuity: a 3% error budget buys skipped tiles."""
    seed = fresh_seed()
    q, k, v = mixed_workload(seed)
    calibrate, options = CALIBRATORS[name]
    calibration = calibrate(q, k, v=v, max_error=0.03, block=(16, 16), **options)
    assert calibration.sparsity > 0.05, f"seed={seed}"
    # Heads differ, so the allocation gives them different parameters.
    assert np.unique(calibration.params).size > 1, f"seed={seed}"


def test_per_head_thresholds_apply_to_the_cpu_backend():
    """BLASST's exact curves transfer to float32 kernels within a decision's rounding."""
    from pysparse_attn import backends

    try:
        backends.load("cpu")
    except ValueError as error:
        pytest.skip(f"CPU backend not built here: {error}")
    seed = fresh_seed()
    q, k, v = mixed_workload(seed, dtype=np.float32)
    calibration = calibrate_blasst(q, k, v=v, max_error=0.02, block=(16, 16))
    out, kept = run_heads_alone(calibration, q, k, v, (16, 16), backend="cpu")
    dense = psa.attention(*(x.astype(np.float64) for x in (q, k, v)), block=(16, 16),
                          backend="reference")
    error = np.linalg.norm(out - dense) / np.linalg.norm(dense)
    # A float32 decision may flip where a statistic sits within rounding of ln(lam): a few
    # tiles, each moving the error by at most its own share.
    assert abs((1.0 - kept.mean()) - calibration.sparsity) <= 4.0 / kept.size, f"seed={seed}"
    assert error <= 0.02 * 1.2, f"seed={seed}"


def brute_force_best(cost, gain, allowance):
    best = -np.inf
    for choice in itertools.product(*(range(cost.shape[1]),) * cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if cost[rows, choice].sum() <= allowance:
            best = max(best, gain[rows, choice].sum())
    return best


@pytest.mark.parametrize("trial", range(20))
def test_allocation_is_feasible_and_near_the_optimum(trial):
    """Greedy on concave hulls: within one hull step's gain of the exhaustive optimum.

    (The LP relaxation over the hulls is at least the optimum and exceeds the greedy's
    integer solution by at most the one step it would take fractionally.)
    """
    from pysparse_attn.calibrate import _allocate, _hull

    rng = np.random.default_rng([trial, fresh_seed()])
    heads, points = 3, 5
    # Curves as calibration measures them: cost and gain grow along the grid (not always
    # concavely), the first point is free.
    cost = np.cumsum(rng.exponential(1.0, (heads, points)), axis=1)
    cost[:, 0] = 0.0
    gain = np.cumsum(rng.integers(0, 10, (heads, points)), axis=1).astype(float)
    gain[:, 0] = 0.0
    allowance = float(rng.uniform(0.5, cost[:, -1].sum()))
    choice, feasible = _allocate(cost, gain, allowance)
    rows = np.arange(heads)
    assert feasible
    assert cost[rows, choice].sum() <= allowance + 1e-12
    hulls = [_hull(cost[h], gain[h]) for h in range(heads)]
    for h, hull in enumerate(hulls):
        assert hull[0] == 0  # the free point starts every hull
        rates = np.diff(gain[h, hull]) / np.diff(cost[h, hull])
        assert (np.diff(rates) <= 1e-12).all(), "hull is not concave"
    largest_step = max(np.diff(gain[h, hull]).max(initial=0.0) for h, hull in enumerate(hulls))
    assert gain[rows, choice].sum() >= brute_force_best(cost, gain, allowance) - largest_step


def test_unmet_budget_warns():
    q, k, v = mixed_workload(fresh_seed())
    grid = [-0.5, -0.1]  # thresholds so high that even the mildest skips most tiles
    with pytest.warns(UserWarning, match="misses"):
        calibration = calibrate_cef(q, k, v=v, max_error=1e-6, grid=grid, block=(16, 16),
                                    backend="reference")
    assert not calibration.met


def test_budget_arguments_are_validated():
    q, k, v = mixed_workload(fresh_seed())
    with pytest.raises(ValueError, match="exactly one of target_sparsity, max_error"):
        calibrate_cef(q, k, 0.1, v=v, max_error=0.01)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_blasst(q, k)
    with pytest.raises(ValueError, match="max_error"):
        calibrate_blasst(q, k, v=v, max_error=1.5)
    with pytest.raises(TypeError, match="max_error"):
        calibrate_blasst(q, k, v=v, max_error="1%")
    with pytest.raises(ValueError, match="min_recall"):
        calibrate_recall(q, k, min_recall=0.0)
    with pytest.raises(ValueError, match="v is needed"):
        calibrate_cef(q, k, max_error=0.01)
    with pytest.raises(ValueError, match="per_head"):
        calibrate_cef(q, k, 0.1, per_head=True)
    with pytest.raises(TypeError, match="per_head"):
        calibrate_blasst(q, k, v=v, max_error=0.01, per_head=1)
    with pytest.raises(ValueError, match="grid"):
        calibrate_recall(q, k, v=v, max_error=0.01, grid=[0.5, 1.5])
    with pytest.raises(TypeError, match="exact"):
        calibrate_recall(q, k, v=v, max_error=0.01, exact=1)
    with pytest.raises(ValueError, match="grid_points"):
        calibrate_blasst(q, k, v=v, max_error=0.01, grid_points=1)


def test_recall_target_sparsity_replay_hits_its_targets():
    seed = fresh_seed()
    q, k, v = workload(seed)
    calibration = calibrate_recall(q, k, [0.1, 0.25], block=(16, 16), backend="reference",
                                   refine=6)
    for rule, achieved, target in zip(calibration.rules(), calibration.achieved,
                                      calibration.targets):
        _, stats = psa.attention(q, k, v, skip=rule, block=(16, 16), backend="reference",
                                 return_stats=True)
        assert stats.sparsity == pytest.approx(achieved, abs=1e-12), f"seed={seed}"
        assert achieved >= target - 1e-12, f"seed={seed}"
