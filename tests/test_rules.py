"""Skip rules (``pysparse_attn/_rules.py``): every rule's decision and guarantee tests.

Validation of scalar and per-head parameters, the kernel parameters and functor names the
backends receive, and the reference margins against DESIGN.md section 5's predicates written
out independently (``attention_ref.rule_margins``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from attention_ref import rule_margins
from hypothesis import assume, given
from hypothesis import strategies as st

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
    """DESIGN.md section 5's contract parameter, written out: ln lam, lam, (1 - R) / R."""
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
# Reference margins against DESIGN.md section 5's predicates

MARGIN_RULES = {
    "blasst": (Blasst, st.floats(1e-8, 1.0)),
    "cef": (Cef, st.floats(-20.0, 0.0)),
    "recall": (Recall, st.floats(0.05, 1.0)),
}


def design_predicate(name, threshold, tile_max, m, l, u, n_keys):
    """DESIGN.md section 5, row ``i`` may skip tile ``J`` when ..., transcribed literally."""
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
