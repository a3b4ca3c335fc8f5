"""Skip rules (``pysparse_attn/_rules.py``): every rule's decision and guarantee tests.

Validation of scalar and per-head parameters, the kernel parameters and functor names the
backends receive, the reference margins against docs/design.rst section 5's predicates written out
independently (``attention_ref``), every decision of the reference replayed by that oracle,
Recall's certificate, and, on every backend, that rules skip on peaked data, that Recall's
bound is certified and that a per-head rule computes what per-head scalar runs compute.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from attention_ref import (attention_ref, expand_kv, mass_share, recall_ref,
                           replay_skip_decisions, rule_margins)
from contract import backend_params, check_forward, exact, laid_out
from hypothesis import assume, event, given, note, target
from hypothesis import strategies as st
from strategies import (ORDERS, RULE_THRESHOLDS, TOLERANCES, make_rule, problems, random_qkv,
                        random_tile_mask, skip_rules_params)

import pysparse_attn as psa
from pysparse_attn import _rules
from pysparse_attn._rules import (ALL_FUNCTORS, NO_SKIP_FUNCTOR, RULES, Blasst, Cef, Recall,
                                  check_rule, rule_functor)

# One valid value of each rule's parameter, and values each must reject (ValueError).
VALID = {Blasst: 1e-3, Cef: -8.5, Recall: 0.9}
OUT_OF_RANGE = {
    Blasst: [0.0, -1e-3, 1.5, math.nan, math.inf],
    Cef: [1e-9, 3.0, math.nan, -math.inf],
    Recall: [0.0, -0.5, 1.0 + 1e-9, math.nan],
}
PARAMETER = {Blasst: "lam", Cef: "lam", Recall: "target"}


def natural_units(rule_type, value):
    """docs/design.rst section 5's contract parameter, written out: ln lam, lam, (1 - R) / R."""
    if rule_type is Blasst:
        return math.log(value)
    if rule_type is Cef:
        return value
    return (1.0 - value) / value


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("rule_type", RULES)
def test_scalar_parameters_out_of_range_are_value_errors_naming_the_parameter(rule_type):
    name = PARAMETER[rule_type]
    for bad in OUT_OF_RANGE[rule_type]:
        with pytest.raises(ValueError, match=name):
            rule_type(bad)


@pytest.mark.parametrize("rule_type", RULES)
@pytest.mark.parametrize("bad", ["0.1", None, True, np.bool_(False), 1j, object()])
def test_parameters_that_are_not_numbers_are_type_errors(rule_type, bad):
    with pytest.raises(TypeError, match=PARAMETER[rule_type]):
        rule_type(bad)


@pytest.mark.parametrize("rule_type", RULES)
def test_per_head_parameters_are_validated_element_by_element(rule_type):
    name = PARAMETER[rule_type]
    good = VALID[rule_type]
    for bad in OUT_OF_RANGE[rule_type]:
        with pytest.raises(ValueError, match=name):
            rule_type(np.array([good, bad, good]))
    with pytest.raises(ValueError, match=name):
        rule_type(np.full((2, 2), good))  # not 1-D
    with pytest.raises(ValueError, match=name):
        rule_type(np.array([]))
    with pytest.raises(TypeError, match=name):
        rule_type(np.array(["0.1", "0.2"]))
    with pytest.raises(TypeError, match=name):
        rule_type(np.array([True, False]))


@pytest.mark.parametrize("rule_type", RULES)
def test_per_head_parameters_are_read_only_float64_copies(rule_type):
    name = PARAMETER[rule_type]
    given_values = np.array([VALID[rule_type]] * 3, dtype=np.float32)
    rule = rule_type(given_values)
    stored = getattr(rule, name)
    assert stored.dtype == np.float64 and stored.shape == (3,) and rule.per_head
    assert not stored.flags.writeable
    given_values[0] = given_values[1] / 2  # the caller's array stays the caller's
    assert stored[0] == np.float64(np.float32(VALID[rule_type]))
    # A list, and a 0-d array or NumPy scalar, are accepted too; the latter two as scalars.
    assert isinstance(getattr(rule_type([VALID[rule_type]] * 2), name), np.ndarray)
    scalar = rule_type(np.array(VALID[rule_type]))
    assert isinstance(getattr(scalar, name), float) and not scalar.per_head
    assert isinstance(getattr(rule_type(np.float32(VALID[rule_type])), name), float)


def test_recall_exact_must_be_a_bool():
    with pytest.raises(TypeError, match="exact"):
        Recall(0.9, exact=1)


def test_skip_must_be_a_rule_or_none():
    assert check_rule(None) is None
    for bad in ["blasst", 1e-3, Blasst]:
        with pytest.raises(TypeError, match="skip"):
            check_rule(bad)
    q = np.zeros((1, 1, 8, 4))
    with pytest.raises(TypeError, match="skip"):
        psa.attention(q, q, q, skip="blasst", backend="reference")


# ---------------------------------------------------------------------------------------------
# What a backend receives: functor names and kernel parameters


def test_functor_names_are_listed_once_each():
    assert NO_SKIP_FUNCTOR == "psa::NoSkip" and rule_functor(None) == NO_SKIP_FUNCTOR
    assert rule_functor(Blasst(0.1)) == "psa::BlasstRule"
    assert rule_functor(Cef(-3.0)) == "psa::CefRule"
    assert rule_functor(Recall(0.9)) == "psa::RecallRule"
    assert rule_functor(Recall(0.9, exact=True)) == "psa::RecallExactRule"
    assert len(set(ALL_FUNCTORS)) == len(ALL_FUNCTORS)
    produced = {NO_SKIP_FUNCTOR} | {rule_functor(rule_type(VALID[rule_type]))
                                    for rule_type in RULES}
    produced.add(rule_functor(Recall(0.9, exact=True)))
    assert produced == set(ALL_FUNCTORS)
    for name in ALL_FUNCTORS:
        assert name.startswith("psa::") and name.isascii()


@pytest.mark.parametrize("rule_type", RULES)
@given(values=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_kernel_params_are_the_contract_parameter_in_natural_log_units(rule_type, values):
    # Map [0, 1] draws into each rule's valid range.
    if rule_type is Blasst:
        values = [10.0 ** (-8 * x) for x in values]
    elif rule_type is Cef:
        values = [-20.0 * x for x in values]
    else:
        values = [0.01 + 0.99 * x for x in values]
    heads = len(values)
    per_head = rule_type(np.array(values)).kernel_params(heads)
    assert per_head.dtype == np.float64 and per_head.shape == (heads,)
    expected = [natural_units(rule_type, value) for value in values]
    np.testing.assert_allclose(per_head, expected, rtol=1e-15, atol=0)
    scalar = rule_type(values[0]).kernel_params(heads)
    np.testing.assert_array_equal(scalar, np.full(heads, natural_units(rule_type, values[0])))


@pytest.mark.parametrize("rule_type", RULES)
def test_kernel_params_with_the_wrong_head_count_name_skip(rule_type):
    rule = rule_type(np.array([VALID[rule_type]] * 3))
    for heads in (1, 2, 4):
        with pytest.raises(ValueError, match="skip"):
            rule.kernel_params(heads)


def test_rules_compare_and_hash_by_value():
    assert Blasst(np.array([0.1, 0.2])) == Blasst([0.1, 0.2])
    assert hash(Blasst(np.array([0.1, 0.2]))) == hash(Blasst([0.1, 0.2]))
    assert Blasst([0.1, 0.2]) != Blasst([0.1, 0.3])
    assert Blasst(0.1) != Cef(math.log(0.1))  # same number, different rule
    assert Recall(0.9) != Recall(0.9, exact=True)
    assert len({Cef(-2.0), Cef(-2.0), Cef([-2.0, -3.0])}) == 2


def test_cef_from_mass_is_log_share_of_a_uniform_tile():
    assert Cef.from_mass(0.1, 64, 32760).lam == pytest.approx(math.log(0.1 * 64 / 32760))
    per_head = Cef.from_mass(np.array([0.1, 1.0]), 64, 128)
    np.testing.assert_allclose(per_head.lam, [math.log(0.1 * 0.5), math.log(0.5)])
    assert Cef.from_mass(1.0, 64, 32).lam == 0.0  # capped at ln 1: never above the max share
    with pytest.raises(ValueError, match="p"):
        Cef.from_mass(0.0, 64, 128)
    with pytest.raises(ValueError, match="block_k"):
        Cef.from_mass(0.1, 0, 128)


# ---------------------------------------------------------------------------------------------
# Reference margins against docs/design.rst section 5's predicates

MARGIN_RULES = {
    "blasst": (Blasst, st.floats(1e-8, 1.0)),
    "cef": (Cef, st.floats(-20.0, 0.0)),
    "recall": (Recall, st.floats(0.05, 1.0)),
}


def design_predicate(name, threshold, tile_max, m, l, u, n_keys):
    """docs/design.rst section 5, row ``i`` may skip tile ``J`` when ..., transcribed literally."""
    if name == "blasst":
        return tile_max - m < math.log(threshold)
    if name == "cef":
        return tile_max - (m + math.log(l)) < threshold
    return u + n_keys * math.exp(tile_max - m) <= (1.0 - threshold) / threshold * l


@pytest.mark.parametrize("name", list(MARGIN_RULES))
@given(data=st.data(), m=st.floats(-30.0, 30.0), gap=st.floats(-40.0, 5.0),
       l=st.floats(1.0, 1e4), u_share=st.floats(0.0, 2.0), n_keys=st.integers(1, 128))
def test_reference_margin_decides_as_the_design_predicate(name, data, m, gap, l, u_share,
                                                          n_keys):
    """The margin's sign is the predicate's verdict, except within rounding of zero."""
    rule_type, thresholds = MARGIN_RULES[name]
    threshold = data.draw(thresholds, label="threshold")
    rule = rule_type(threshold)
    param = float(rule.kernel_params(1)[0])
    tile_max = m + gap  # the running max m is at least the first tile's max; l >= 1 then
    u = u_share * l
    added = n_keys * math.exp(tile_max - m)
    margin = rule.margin(tile_max, m, l, u, added, param)
    verdict = margin >= 0.0 if rule.skip_at_zero else margin > 0.0
    # Margins are differences of logs of O(30) quantities: float64 rounding ~1e-13.
    assume(abs(margin) > 1e-9)
    assert verdict == design_predicate(name, threshold, tile_max, m, l, u, n_keys)
    # The independent oracle of the property tests agrees on the sign.
    oracle = float(rule_margins(name, threshold, np.array([tile_max]), np.array([m]),
                                np.array([l]), np.array([u]), np.array([added]))[0])
    assert (oracle > 0) == (margin > 0) or abs(oracle) < 1e-9


def test_no_skip_and_degenerate_recall_margins():
    assert _rules.no_skip_margin(0.0, 0.0, 1.0, 0.0, 1.0, 0.0) == -math.inf
    # Recall(1): no mass may be skipped, whatever the tile (limit 0).
    assert Recall.margin(-1e3, 0.0, 1.0, 0.0, 0.0, 0.0) == -math.inf
    # A tile whose bound underflows to zero adds nothing: always skippable under Recall < 1.
    assert Recall.margin(-1e3, 0.0, 1.0, 0.0, 0.0, 0.1) == math.inf


# ---------------------------------------------------------------------------------------------
# Decisions in the loop (reference backend, float64, random problems)

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
    offsets, indices = np.asarray(plan.row_offsets), np.asarray(plan.row_indices)
    B, H = offsets.shape[:2]
    return [[[list(indices[b, h, offsets[b, h, i]:offsets[b, h, i + 1]])
              for i in range(offsets.shape[2] - 1)] for h in range(H)] for b in range(B)]


def max_value_norm(problem):
    """``max_j ||v_j||`` per query head, shaped ``(B, H, 1)`` to broadcast over rows."""
    v = expand_kv(problem.v, problem.q.shape[1])
    return np.linalg.norm(v, axis=-1).max(axis=-1)[..., None]


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
    """With a plan, the guarantee covers the visited tiles only (docs/design.rst section 5)."""
    out, stats = run(problem, select=psa.TopK(k=top), skip=psa.Recall(recall_target))
    assert stats.bounded == (top >= problem.n_tiles[1])  # full rows only if TopK kept all
    share = mass_share(problem.q, problem.k, stats.kept, stats.visited, problem.block,
                       problem.scale)
    assert (share >= recall_target - RECALL_SLACK).all()
    assert (stats.recall_bound <= share + RECALL_SLACK).all()
    assert (stats.kept <= stats.visited).all()


@pytest.mark.parametrize("name", list(RULE_THRESHOLDS))
@given(problem=problems(sharp=True, min_n=17, max_n=160), data=st.data(),
       order=st.sampled_from(ORDERS), peak=st.integers(0, 4), with_selector=st.booleans(),
       per_head=st.booleans())
def test_skip_decisions_obey_their_rule(name, problem, data, order, peak, with_selector,
                                        per_head):
    """Replayed by the independent oracle, head by head with that head's parameter."""
    heads = problem.q.shape[1]
    thresholds = [data.draw(RULE_THRESHOLDS[name], label="threshold")
                  for _ in range(heads if per_head else 1)]
    rule = make_rule(name, np.array(thresholds) if per_head else thresholds[0])
    select = psa.TopK(ratio=0.6) if with_selector else None
    out, stats = run(problem, skip=rule, order=order, peak=peak, select=select)
    lists = visit_lists(stats.plan)
    # The visit lists are exactly the visited tiles, and nothing unvisited is kept.
    listed = np.zeros_like(stats.visited)
    for b, per_head_lists in enumerate(lists):
        for h, per_tile in enumerate(per_head_lists):
            for i, tiles in enumerate(per_tile):
                assert len(set(tiles)) == len(tiles), "a tile is visited twice"
                listed[b, h, i, tiles] = True
    np.testing.assert_array_equal(listed, stats.visited)
    assert (stats.kept <= stats.visited).all()
    skipped = 0
    for h in range(heads):
        head_lists = [[per_b[h]] for per_b in lists]
        problems_found, head_skipped = replay_skip_decisions(
            problem.q[:, h:h + 1], problem.k[:, h // (heads // problem.k.shape[1])][:, None],
            head_lists, stats.kept[:, h:h + 1], name, thresholds[h if per_head else 0],
            problem.block, problem.scale)
        assert not problems_found, f"head {h}: " + "\n".join(problems_found[:10])
        skipped += head_skipped
    note(f"{skipped} tiles skipped in the loop")
    event("some tiles skipped in the loop" if skipped else "no tile skipped in the loop")
    target(float(skipped), label="tiles skipped in the loop")
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
    offsets, indices = np.asarray(stats.plan.row_offsets), np.asarray(stats.plan.row_indices)
    first = np.take_along_axis(indices, offsets[..., :-1].astype(np.intp), axis=-1)
    assert (first >= 0).all()
    first_kept = np.take_along_axis(stats.kept, first[..., None].astype(np.intp), axis=-1)
    assert first_kept.all()
    assert stats.kept.any(axis=-1).all()


# ---------------------------------------------------------------------------------------------
# Every backend: skipping happens, Recall's certificate, per-head = per-head scalar runs

BACKENDS = backend_params()


def peaked(seed, backend, heads=4):
    """Peaked logits: a direction shared by the queries and, with a random signed weight per
    key tile, by that tile's keys, and key tiles of very different gains, so most tiles hold
    little mass. GPU: head dim 64 and 16 key tiles of 64 (the sizes it supports).

    ``focus=4`` shifts tile J's logits by about ``16 c_J``: with ten key tiles per head the
    skippable share stays above 27% on every one of 400 seeds for each rule and order (at
    ``focus=3`` about one seed in a hundred fell below the 20% the vacuity guard asks)."""
    rng = np.random.default_rng(seed)
    n, dim, block = (1000, 64, (64, 64)) if backend.gpu else (300, 32, (32, 32))
    q, k, v = random_qkv(rng, 1, heads, heads // 2, n, n, dim, 3.0, 1.5, block[1], focus=4.0)
    return (q, k, v), block


def fresh_seed():
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"seed={seed}")
    return seed


def call(backend, q, k, v, dtype, block, **options):
    arrays = [laid_out(x, dtype, "bhnd", backend) for x in (q, k, v)]
    out, stats = psa.attention(*arrays, block=block, backend=backend.name, return_stats=True,
                               **options)
    return arrays, out, stats


def backend_dtype(backend):
    return "float32" if "float32" in backend.dtypes else "bfloat16"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", [psa.Blasst(1e-2), psa.Cef(-6.0), psa.Recall(0.9),
                                  psa.Recall(0.9, exact=True),
                                  psa.Recall(np.array([0.7, 0.8, 0.9, 0.95]))],
                         ids=["blasst", "cef", "recall", "recall_exact", "recall-per-head"])
@pytest.mark.parametrize("order", ORDERS)
def test_rules_skip_on_peaked_data(backend, rule, order):
    """Guards every decision test against vacuity: on peaked logits each rule skips tiles
    (checked against the contract on the way)."""
    (q, k, v), block = peaked(fresh_seed(), backend)
    result = check_forward(backend, q, k, v, dtype=backend_dtype(backend), block=block,
                           rule=rule, order=order, peak=4)
    assert result["skipped"] > 0.2 * result["visited"].sum(), "few or no tiles skipped"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recall_target", [0.6, 0.9, 0.99])
@pytest.mark.parametrize("exact_sums", [False, True])
def test_recall_certificate_on_every_backend(backend, recall_target, exact_sums):
    """No selector: every row keeps >= target of its softmax mass (exact float64 oracle), and
    the reported bound lies between the target and the true recall."""
    (q, k, v), block = peaked(fresh_seed(), backend)
    dtype = backend_dtype(backend)
    arrays, _, stats = call(backend, q, k, v, dtype, block, order="peak",
                            skip=psa.Recall(recall_target, exact=exact_sums))
    q64, k64 = exact(arrays[0]), exact(arrays[1])
    kept, bound = backend.host(stats.kept), np.asarray(backend.host(stats.recall_bound),
                                                       dtype=np.float64)
    true_recall = psa.recall(q64, k64, kept, block=block)
    # float64: rounding of sums only; fp32 bookkeeping of a bound that can sit exactly at the
    # threshold: float32 rounding (1e-5 relative); the GPU's approximate exp2: 1e-4.
    slack = 1e-12 if dtype == "float64" or backend.name == "reference" else \
        (1e-4 if backend.approximate else 1e-5)
    assert (bound >= recall_target * (1 - slack)).all()
    assert (true_recall >= recall_target * (1 - slack)).all()
    assert (bound <= true_recall + slack).all(), "the bound must not exceed the true recall"
    if recall_target <= 0.9:
        assert not kept.all(), "nothing skipped: the certificate test would be vacuous"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", [psa.Blasst(np.array([1e-1, 1e-2, 1e-3, 1e-4])),
                                  psa.Cef(np.array([-2.0, -4.0, -6.0, -30.0])),
                                  psa.Recall(np.array([0.6, 0.8, 0.95, 1.0])),
                                  psa.Recall(np.array([0.5, 0.7, 0.9, 0.99]), exact=True)],
                         ids=["blasst", "cef", "recall", "recall_exact"])
def test_per_head_rules_equal_per_head_scalar_runs(backend, rule):
    """Head h of a per-head rule computes exactly what the scalar rule of head h computes on
    head h alone (GQA: two query heads share a kv head): same decisions, same numbers."""
    (q, k, v), block = peaked(fresh_seed(), backend)
    dtype = backend_dtype(backend)
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    _, out, stats = call(backend, q, k, v, dtype, block, skip=rule, order="peak")
    field = "target" if isinstance(rule, psa.Recall) else "lam"
    values = getattr(rule, field)
    kept = backend.host(stats.kept)
    for h in range(heads):
        scalar = dataclasses.replace(rule, **{field: float(values[h])})
        kv = h // group
        _, head_out, head_stats = call(backend, q[:, h:h + 1], k[:, kv:kv + 1],
                                       v[:, kv:kv + 1], dtype, block, skip=scalar,
                                       order="peak")
        # Same rows, same plan row, same parameter: the same operations in the same order.
        np.testing.assert_array_equal(backend.host(head_stats.kept)[:, 0], kept[:, h],
                                      err_msg=f"head {h}")
        np.testing.assert_array_equal(exact(head_out)[:, 0], exact(out)[:, h],
                                      err_msg=f"head {h}: out")
        for name in ("lse", "recall_bound", "visited"):
            np.testing.assert_array_equal(backend.host(getattr(head_stats, name))[:, 0],
                                          backend.host(getattr(stats, name))[:, h],
                                          err_msg=f"head {h}: {name}")
    # The parameters differ, so the heads must differ in what they skip.
    per_head_sparsity = 1.0 - kept.mean(axis=(0, 2, 3))
    assert np.unique(per_head_sparsity).size > 1
