"""A program's terms (services/common/terms.py): bonuses, scope, the effective
rate and the subsidy, and both directions of their wire form."""

import pytest

from services.common import terms
from services.common.terms import (
    ANYWHERE,
    Bonus,
    DatacenterScope,
    ProgramTerms,
    rate_at,
    scope_from_wire,
    scope_to_wire,
    subsidy_fen,
    terms_from_wire,
    terms_to_wire,
)

WEST_GOV = {"government_run": True, "hub_region": "west", "chip_origin": "domestic"}
EAST = {"government_run": False, "hub_region": "east", "chip_origin": "imported"}

TERMS = ProgramTerms(
    rate_bp=5000,
    max_rate_bp=6500,
    bonuses=(
        Bonus((("government_run", True),), 1000),
        Bonus((("chip_origin", "domestic"), ("hub_region", "west")), 1000),
        Bonus(((terms.UTILISATION_BELOW, 30),), 500),
    ),
    datacenters=DatacenterScope(hub_region="west", exclude=frozenset({"dc-x"})),
)


@pytest.mark.parametrize(
    "scope",
    [
        ANYWHERE,
        DatacenterScope(ids=frozenset({"a", "b"})),
        DatacenterScope(hub_region="west", government_run=False),
        DatacenterScope(chip_origin="domestic", exclude=frozenset({"c"})),
    ],
)
def test_a_scope_survives_the_wire(scope):
    assert scope_from_wire(scope_to_wire(scope)) == scope


def test_terms_survive_the_wire():
    wire = {"rate_bp": TERMS.rate_bp, **terms_to_wire(TERMS)}
    assert terms_from_wire(wire) == TERMS
    assert wire["datacenters"] == {"hub_region": "west", "exclude": ["dc-x"]}
    assert wire["bonuses"][1] == {
        "when": {"chip_origin": "domestic", "hub_region": "west"},
        "add_bp": 1000,
    }


def test_unpublished_terms_are_no_cap_no_bonus_anywhere():
    assert terms_from_wire({"rate_bp": 4000}) == ProgramTerms(rate_bp=4000)
    assert scope_to_wire(ANYWHERE) == "any"


@pytest.mark.parametrize(
    ("wire", "admitted"),
    [
        (None, {"a", "b", "c"}),
        ("any", {"a", "b", "c"}),
        (["a", 7], {"a"}),
        ({"ids": ["a", "b"], "exclude": ["b"]}, {"a"}),
        ({"hub_region": "west", "colour": "red"}, {"a", "b", "c"}),
        ({"hub_region": "east"}, set()),
        ({"ids": "abc"}, set()),  # not a list: matches nothing
        ("anywhere", set()),  # a shape the reader does not know
        (17, set()),
    ],
)
def test_the_wire_is_read_leniently(wire, admitted):
    scope = scope_from_wire(wire)
    assert {dc for dc in ("a", "b", "c") if scope.admits(dc, WEST_GOV)} == admitted


def test_bonuses_add_up_to_the_cap_and_say_why():
    rate = rate_at(TERMS, EAST)
    assert (rate.bp, rate.bonuses, rate.capped_at_bp) == (5000, (), None)
    rate = rate_at(TERMS, WEST_GOV)
    assert rate.bp == 6500 and rate.base_bp == 5000 and rate.capped_at_bp == 6500
    assert [b.describe() for b in rate.bonuses] == [
        "government_run=True",
        "chip_origin=domestic, hub_region=west",
    ]
    assert terms.effective_rate_bp(TERMS, {**EAST, "utilisation": 0.2}) == 5500
    uncapped = ProgramTerms(rate_bp=5000, bonuses=TERMS.bonuses)
    assert terms.effective_rate_bp(uncapped, {**WEST_GOV, "utilisation": 0}) == 7500


@pytest.mark.parametrize(
    ("utilisation", "applies"), [(None, False), (0.0, True), (0.29, True), (0.3, False)]
)
def test_the_utilisation_bonus_needs_a_figure_below_the_threshold(utilisation, applies):
    bonus = Bonus(((terms.UTILISATION_BELOW, 30),), 500)
    assert bonus.applies({**EAST, "utilisation": utilisation}) is applies


def test_a_subsidy_is_limited_by_what_is_known():
    assert subsidy_fen(1001, 8000, None) == 800  # rounded down, no limit known
    assert subsidy_fen(1000, 8000, 500) == 500
    assert subsidy_fen(1000, 8000, None, 100) == 100
    assert subsidy_fen(1000, 8000, -5, None) == 0  # never below zero
    with pytest.raises(ValueError):
        subsidy_fen(-1, 8000, None)
