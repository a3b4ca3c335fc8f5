"""Calibration returns thresholds that reach their targets in the library's own forward pass."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import pysparse_attn as psa
from pysparse_attn._plan import build_plan
from pysparse_attn._reference import decision_slack
from pysparse_attn._rules import Blasst
from pysparse_attn.calibrate import blasst_statistics, calibrate_blasst, calibrate_cef
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
