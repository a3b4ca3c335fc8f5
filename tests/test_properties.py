"""Properties of ``attention`` on the float64 reference backend (DESIGN.md sections 2, 4, 5).

Every test draws fresh random problems (odd lengths, so partial tiles are the rule) and
compares the library with the independent oracle of ``attention_ref.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given, note, target
from hypothesis import strategies as st

import pysparse_attn as psa
from attention_ref import (
    attention_ref,
    expand_kv,
    mass_share,
    n_tiles,
    recall_ref,
    replay_skip_decisions,
)
from strategies import (
    ORDERS,
    RULE_THRESHOLDS,
    TOLERANCES,
    make_rule,
    poisoned_allocations,
    problems,
    random_tile_mask,
    skip_rules_params,
)

RTOL, ATOL = TOLERANCES["float64"]
# Recall and bound comparisons: both sides are float64 sums of <= 200 positive terms.
RECALL_SLACK = 1e-12


def run(problem, q=None, k=None, v=None, **options):
    """``psa.attention`` on the reference backend with the problem's block and scale."""
    q = problem.q if q is None else q
    k = problem.k if k is None else k
    v = problem.v if v is None else v
    return psa.attention(q, k, v, block=problem.block, scale=problem.scale,
                         backend="reference", return_stats=True, **options)


def visit_lists(plan):
    """The plan's visit lists as nested Python lists ``[b][h][I] -> [J, ...]``."""
    visit, count = np.asarray(plan.visit), np.asarray(plan.count)
    B, H, nq = count.shape
    return [[[list(visit[b, h, i, :count[b, h, i]]) for i in range(nq)] for h in range(H)]
            for b in range(B)]


def max_value_norm(problem):
    """``max_j ||v_j||`` per query head, shaped ``(B, H, 1)`` to broadcast over rows."""
    v = expand_kv(problem.v, problem.q.shape[1])
    return np.linalg.norm(v, axis=-1).max(axis=-1)[..., None]


# ---------------------------------------------------------------------------------------------
# Dense


@given(problems(), st.sampled_from(ORDERS))
def test_dense_equals_softmax_qk_v(problem, order):
    out, stats = run(problem, order=order)
    expected, expected_lse = attention_ref(problem.q, problem.k, problem.v, problem.scale)
    assert out.dtype == np.float64 and out.shape == problem.q.shape
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.lse, expected_lse, rtol=RTOL, atol=ATOL)
    assert stats.kept.all() and stats.visited.all()
    assert stats.density == 1.0 and stats.sparsity == 0.0
    np.testing.assert_allclose(stats.recall_bound, 1.0, rtol=0, atol=0)


@given(problems())
def test_lse_is_log_sum_exp_of_scaled_logits(problem):
    _, stats = run(problem)
    scale = problem.effective_scale
    s = scale * np.einsum("bhid,bhjd->bhij", problem.q, expand_kv(problem.k, problem.q.shape[1]))
    # log-sum-exp written the long way (shift by the row max): a second, separate formula.
    shift = s.max(axis=-1)
    expected = shift + np.log(np.exp(s - shift[..., None]).sum(axis=-1))
    assert stats.lse.dtype == np.float64
    np.testing.assert_allclose(stats.lse, expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# BlockMask


@given(problems(), st.floats(0.0, 1.0), st.booleans(), st.sampled_from(ORDERS))
def test_block_mask_equals_masked_softmax(problem, density, shared, order):
    B, H = problem.q.shape[:2]
    nq, nk = problem.n_tiles
    shape = (1, 1, nq, nk) if shared else (B, H, nq, nk)
    mask = random_tile_mask(problem.rng(1), shape, density)
    given_mask = mask[0, 0] if shared else mask
    out, stats = run(problem, select=psa.BlockMask(given_mask), order=order)
    full_mask = np.broadcast_to(mask, (B, H, nq, nk))
    expected, expected_lse = attention_ref(problem.q, problem.k, problem.v, problem.scale,
                                           full_mask, problem.block)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.lse, expected_lse, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(stats.kept, full_mask)
    np.testing.assert_array_equal(stats.visited, full_mask)
    assert stats.density == pytest.approx(full_mask.mean(), abs=1e-15)


@given(problems())
def test_all_true_mask_equals_dense(problem):
    B, H = problem.q.shape[:2]
    mask = np.ones((B, H) + problem.n_tiles, dtype=bool)
    masked, masked_stats = run(problem, select=psa.BlockMask(mask))
    dense, dense_stats = run(problem)
    # Same plan, same loop: identical, not merely close.
    np.testing.assert_array_equal(masked, dense)
    np.testing.assert_array_equal(masked_stats.lse, dense_stats.lse)


@given(problems(max_n=120))
def test_flop_density_counts_visited_qk_and_kept_pv_by_valid_size(problem):
    mask = random_tile_mask(problem.rng(2), (1, 1) + problem.n_tiles, 0.5)
    _, stats = run(problem, select=psa.BlockMask(mask[0, 0]), skip=psa.Blasst(0.05))
    Nq, Nk = problem.q.shape[2], problem.k.shape[2]
    rows = np.diff(np.minimum(np.arange(problem.n_tiles[0] + 1) * problem.block[0], Nq))
    keys = np.diff(np.minimum(np.arange(problem.n_tiles[1] + 1) * problem.block[1], Nk))
    area = rows[:, None] * keys[None, :]
    dense_cost = 2.0 * problem.q.shape[0] * problem.q.shape[1] * Nq * Nk
    spent = (stats.visited * area).sum() + (stats.kept * area).sum()
    assert stats.flop_density == pytest.approx(spent / dense_cost, rel=1e-12)
    assert stats.flop_sparsity == pytest.approx(1.0 - spent / dense_cost, abs=1e-12)
    assert stats.density == pytest.approx(stats.kept.mean(), abs=1e-15)
    assert stats.sparsity == pytest.approx(1.0 - stats.kept.mean(), abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Recall: the certified guarantee, for every visit order


@given(problems(sharp=True), st.floats(0.5, 1.0), st.booleans(), st.sampled_from(ORDERS),
       st.integers(0, 4))
def test_recall_rule_certifies_row_recall_and_error(problem, recall_target, exact, order, peak):
    rule = psa.Recall(recall_target, exact=exact)
    out, stats = run(problem, skip=rule, order=order, peak=peak)
    true_recall = psa.recall(problem.q, problem.k, stats.kept, block=problem.block,
                             scale=problem.scale)
    np.testing.assert_allclose(
        true_recall, recall_ref(problem.q, problem.k, stats.kept, problem.block, problem.scale),
        rtol=0, atol=RECALL_SLACK)
    note(f"skipped tiles: {int((~stats.kept).sum())}, min recall {true_recall.min():.6f}")
    event("some tiles skipped" if not stats.kept.all() else "no tile skipped")
    target(float((~stats.kept).sum()), label="tiles skipped")
    assert stats.bounded
    assert (true_recall >= recall_target - RECALL_SLACK).all(), "true recall below the target"
    assert (stats.recall_bound >= recall_target - RECALL_SLACK).all(), "bound below target"
    assert (stats.recall_bound <= true_recall + RECALL_SLACK).all(), "bound above true recall"
    dense, _ = attention_ref(problem.q, problem.k, problem.v, problem.scale)
    error = np.linalg.norm(out - dense, axis=-1)
    v_max = max_value_norm(problem)
    # The sharper per-row form (with the row's own recall) implies the target form.
    assert (error <= 2.0 * (1.0 - true_recall) * v_max + 1e-9).all()
    assert (error <= 2.0 * (1.0 - recall_target) * v_max + 1e-9).all()


@given(problems(sharp=True), st.floats(0.0, 1.0))
def test_recall_oracle_is_the_kept_share_of_each_softmax_row(problem, density):
    kept = problem.rng(9).random(problem.q.shape[:2] + problem.n_tiles) < density
    result = psa.recall(problem.q, problem.k, kept, block=problem.block, scale=problem.scale)
    assert result.dtype == np.float64 and result.shape == problem.q.shape[:3]
    np.testing.assert_allclose(
        result, recall_ref(problem.q, problem.k, kept, problem.block, problem.scale),
        rtol=0, atol=RECALL_SLACK)
    everything = np.ones_like(kept)
    np.testing.assert_allclose(
        psa.recall(problem.q, problem.k, everything, block=problem.block, scale=problem.scale),
        1.0, rtol=0, atol=RECALL_SLACK)


@given(problems(sharp=True), st.floats(0.5, 0.999), st.integers(1, 3))
def test_recall_with_selector_bounds_the_visited_share(problem, recall_target, top):
    """With a plan, the guarantee covers the visited tiles only (DESIGN.md section 5)."""
    out, stats = run(problem, select=psa.TopK(k=top), skip=psa.Recall(recall_target))
    assert stats.bounded == (top >= problem.n_tiles[1])  # full rows only if TopK kept all
    share = mass_share(problem.q, problem.k, stats.kept, stats.visited, problem.block,
                       problem.scale)
    assert (share >= recall_target - RECALL_SLACK).all()
    assert (stats.recall_bound <= share + RECALL_SLACK).all()
    assert (stats.kept <= stats.visited).all()


# ---------------------------------------------------------------------------------------------
# Every skip decision obeys its rule


@pytest.mark.parametrize("name", list(RULE_THRESHOLDS))
@given(problem=problems(sharp=True, min_n=17, max_n=160), data=st.data(),
       order=st.sampled_from(ORDERS), peak=st.integers(0, 4), with_selector=st.booleans())
def test_skip_decisions_obey_their_rule(name, problem, data, order, peak, with_selector):
    threshold = data.draw(RULE_THRESHOLDS[name], label="threshold")
    select = psa.TopK(ratio=0.6) if with_selector else None
    out, stats = run(problem, skip=make_rule(name, threshold), order=order, peak=peak,
                     select=select)
    lists = visit_lists(stats.plan)
    # The visit lists are exactly the visited tiles, and nothing unvisited is kept.
    listed = np.zeros_like(stats.visited)
    for b, per_head in enumerate(lists):
        for h, per_tile in enumerate(per_head):
            for i, tiles in enumerate(per_tile):
                assert len(set(tiles)) == len(tiles), "a tile is visited twice"
                listed[b, h, i, tiles] = True
    np.testing.assert_array_equal(listed, stats.visited)
    assert (stats.kept <= stats.visited).all()
    problems_found, skipped = replay_skip_decisions(
        problem.q, problem.k, lists, stats.kept, name, threshold, problem.block, problem.scale)
    note(f"{skipped} tiles skipped in the loop")
    event("some tiles skipped in the loop" if skipped else "no tile skipped in the loop")
    target(float(skipped), label="tiles skipped in the loop")
    assert not problems_found, "\n".join(problems_found[:10])
    # The output is exact attention over the kept tiles.
    expected, expected_lse = attention_ref(problem.q, problem.k, problem.v, problem.scale,
                                           stats.kept, problem.block)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats.lse, expected_lse, rtol=RTOL, atol=ATOL)


@given(problems(sharp=True), skip_rules_params, st.sampled_from(ORDERS),
       st.sampled_from([None, "topk", "topp", "mask"]))
def test_first_visited_tile_is_never_skipped(problem, rule_params, order, selector):
    nq, nk = problem.n_tiles
    select = {
        None: None,
        "topk": psa.TopK(k=2),
        "topp": psa.TopP(0.5),
        "mask": psa.BlockMask(random_tile_mask(problem.rng(3), (nq, nk), 0.4)),
    }[selector]
    _, stats = run(problem, skip=make_rule(*rule_params), order=order, select=select)
    first = np.asarray(stats.plan.visit)[..., 0]
    assert (first >= 0).all()
    first_kept = np.take_along_axis(stats.kept, first[..., None].astype(np.intp), axis=-1)
    assert first_kept.all()
    assert stats.kept.any(axis=-1).all()


def test_skip_rules_do_skip_on_peaked_data():
    """Guards the rule properties against vacuity: on peaked logits every rule skips tiles."""
    rng = np.random.default_rng(20261123)
    B, H, N, D = 1, 2, 160, 16
    direction = rng.standard_normal(D)
    direction *= np.sqrt(14.0) * D**0.25 / np.linalg.norm(direction)
    q = rng.standard_normal((B, H, N, D)) + direction
    k = rng.standard_normal((B, H, N, D))
    v = rng.standard_normal((B, H, N, D))
    # Key tile 3 shares the queries' common direction: its logits sit ~14 above the others',
    # so it holds nearly all of every row's mass.
    k[:, :, 48:64] += direction
    for rule in (psa.Blasst(1e-2), psa.Cef(-4.0), psa.Recall(0.9), psa.Recall(0.9, exact=True)):
        for order in ORDERS:
            _, stats = psa.attention(q, k, v, skip=rule, order=order, block=(16, 16),
                                     backend="reference", return_stats=True)
            assert stats.sparsity > 0.2, (rule, order, stats.sparsity)


# ---------------------------------------------------------------------------------------------
# Decomposition and padding


@given(problems(min_n=2), st.data())
def test_merging_disjoint_key_sets_by_lse_gives_the_whole(problem, data):
    Nk = problem.k.shape[2]
    in_first = problem.rng(4).random(Nk) < data.draw(st.floats(0.1, 0.9), label="share")
    in_first[0], in_first[-1] = True, False  # both parts non-empty
    parts = []
    for keys in (np.flatnonzero(in_first), np.flatnonzero(~in_first)):
        out, stats = run(problem, k=problem.k[:, :, keys], v=problem.v[:, :, keys])
        parts.append((out, stats.lse))
    (out_a, lse_a), (out_b, lse_b) = parts
    lse = np.logaddexp(lse_a, lse_b)
    merged = np.exp(lse_a - lse)[..., None] * out_a + np.exp(lse_b - lse)[..., None] * out_b
    whole, whole_stats = run(problem)
    np.testing.assert_allclose(merged, whole, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lse, whole_stats.lse, rtol=RTOL, atol=ATOL)


@given(problems(min_n=33), st.data())
def test_merging_complementary_block_masks_gives_the_whole(problem, data):
    nq, nk = problem.n_tiles  # nk >= 2: 33 keys need two tiles of at most 32
    B, H = problem.q.shape[:2]
    mask = problem.rng(5).random((B, H, nq, nk)) < data.draw(st.floats(0.2, 0.8), label="d")
    mask[..., 0], mask[..., -1] = True, False  # both halves keep a tile in every query tile
    out_a, stats_a = run(problem, select=psa.BlockMask(mask))
    out_b, stats_b = run(problem, select=psa.BlockMask(~mask))
    lse = np.logaddexp(stats_a.lse, stats_b.lse)
    merged = (np.exp(stats_a.lse - lse)[..., None] * out_a
              + np.exp(stats_b.lse - lse)[..., None] * out_b)
    whole, _ = run(problem)
    np.testing.assert_allclose(merged, whole, rtol=RTOL, atol=ATOL)


@given(problems(), st.integers(1, 3), st.sampled_from([None, "recall", "blasst"]))
def test_masked_out_key_tiles_never_change_results(problem, extra_tiles, rule):
    """Whole key tiles prepended and masked out change nothing, even with huge logits."""
    B, Hkv, Nk, D = problem.k.shape
    nq, nk = problem.n_tiles
    extra = extra_tiles * problem.block[1]
    rng = problem.rng(6)
    junk_k = 1e3 * rng.standard_normal((B, Hkv, extra, D))  # would dominate if ever visited
    junk_v = 1e6 * rng.standard_normal((B, Hkv, extra, D))
    k = np.concatenate([junk_k, problem.k], axis=2)
    v = np.concatenate([junk_v, problem.v], axis=2)
    mask = random_tile_mask(rng, (1, 1, nq, nk), 0.6)[0, 0]
    padded_mask = np.concatenate([np.zeros((nq, extra_tiles), dtype=bool), mask], axis=1)
    skip = {None: None, "recall": psa.Recall(0.9), "blasst": psa.Blasst(1e-3)}[rule]
    # Natural order keeps the visit sequence of the real tiles identical in both calls.
    out, stats = run(problem, select=psa.BlockMask(mask), skip=skip, order="natural")
    padded_out, padded_stats = run(problem, k=k, v=v, select=psa.BlockMask(padded_mask),
                                   skip=skip, order="natural")
    np.testing.assert_allclose(padded_out, out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(padded_stats.lse, stats.lse, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(padded_stats.kept[..., extra_tiles:], stats.kept)
    assert not padded_stats.visited[..., :extra_tiles].any()


@given(problems(), st.integers(1, 40))
def test_extra_query_rows_never_change_other_rows(problem, extra_rows):
    """Rows are independent under a fixed mask: appending queries changes no earlier row."""
    B, H, Nq, D = problem.q.shape
    q = np.concatenate([problem.q, 50.0 * problem.rng(7).standard_normal((B, H, extra_rows, D))],
                       axis=2)
    nq_long = n_tiles(Nq + extra_rows, problem.block[0])
    nk = problem.n_tiles[1]
    mask = random_tile_mask(problem.rng(8), (nq_long, nk), 0.5)
    longer, _ = run(problem, q=q, select=psa.BlockMask(mask))
    shorter, _ = run(problem, select=psa.BlockMask(mask[:problem.n_tiles[0]]))
    np.testing.assert_allclose(longer[:, :, :Nq], shorter, rtol=RTOL, atol=ATOL)


@given(problems(sharp=True), skip_rules_params, st.sampled_from(ORDERS))
def test_memory_past_a_view_never_changes_results(problem, rule_params, order):
    """Inputs that are views into larger NaN-filled buffers give the results of exact copies:
    the partial last tiles are padded by the library, never read past the array."""
    def poisoned_view(x):
        B, H, N, D = x.shape
        buffer = np.full((B, H, N + 37, D + 3), np.nan)
        buffer[:, :, :N, :D] = x
        return buffer[:, :, :N, :D]

    rule = make_rule(*rule_params)
    q, k, v = (poisoned_view(x) for x in (problem.q, problem.k, problem.v))
    out, stats = run(problem, q=q, k=k, v=v, skip=rule, order=order)
    copy_out, copy_stats = run(problem, skip=rule, order=order)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, copy_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(stats.kept, copy_stats.kept)


@given(problems(sharp=True), skip_rules_params, st.sampled_from([None, "mask", "topp"]))
def test_results_never_depend_on_uninitialised_memory(problem, rule_params, selector):
    """Every element of every result is written: poisoned allocations change nothing."""
    nq, nk = problem.n_tiles
    select = {
        None: None,
        "mask": psa.BlockMask(random_tile_mask(problem.rng(10), (nq, nk), 0.5)),
        "topp": psa.TopP(0.7),
    }[selector]
    rule = make_rule(*rule_params)
    do = problem.rng(11).standard_normal(problem.q.shape)

    def everything():
        out, stats = run(problem, select=select, skip=rule)
        grads = psa.attention_vjp(problem.q, problem.k, problem.v, do, kept=stats.kept,
                                  block=problem.block, scale=problem.scale, backend="reference")
        sla_out = psa.sla_attention(problem.q, problem.k, problem.v, critical=0.5,
                                    negligible=0.2, skip=rule, block=problem.block,
                                    scale=problem.scale, backend="reference",
                                    proj_weight=np.eye(problem.q.shape[-1]))
        return (out, stats.lse, stats.kept, stats.visited, stats.recall_bound, sla_out) + grads

    clean = everything()
    with poisoned_allocations():
        poisoned = everything()
    for name, a, b in zip("out lse kept visited bound sla dq dk dv".split(), clean, poisoned):
        np.testing.assert_array_equal(b, a, err_msg=name)
