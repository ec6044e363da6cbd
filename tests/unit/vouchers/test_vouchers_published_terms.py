"""What a city publishes of its programs lets the registry price a voucher's
use exactly as the city will book it: same rate, bonuses, cap and scope."""

import itertools

import pytest

from services.city_registry.domain.events import program_terms
from services.city_registry.domain.recommendations import voucher_terms
from services.city_registry.domain.state import ProgramState
from services.common.contracts import ProgramPublishedSchema
from services.common.terms import effective_rate_bp
from services.vouchers import domain
from services.vouchers.rules import load_rules, parse_rules

DATACENTERS = [
    (
        "guian-gov-01",
        {"government_run": True, "hub_region": "west", "chip_origin": "domestic"},
    ),
    (
        "lingang-com-01",
        {"government_run": False, "hub_region": "east", "chip_origin": "imported"},
    ),
]


def published(rules):
    return [
        domain.program_summary(p, rules.version, rules.sha256, p.budget_fen, 1, 0, 0)
        for p in rules.programs
    ]


def registry_terms(city, program):
    """The terms the registry prices with, from a published program."""
    state = ProgramState(
        id=program["id"], rate_bp=program["rate_bp"], terms=program_terms(program)
    )
    return voucher_terms(city, state, None)


@pytest.mark.parametrize(
    "city", ["shanghai", "chengdu", "shandong", "beijing", "shenzhen"]
)
def test_the_registry_prices_as_the_city_books(city):
    rules = load_rules(f"deploy/cities/{city}.yaml")
    for program, summary in zip(rules.programs, published(rules), strict=True):
        terms = registry_terms(city, summary).terms
        for dc_id, attrs in DATACENTERS:
            assert terms.datacenters.admits(dc_id, attrs) == (
                program.datacenters.admits(dc_id, attrs)
            )
            rate = effective_rate_bp(terms, attrs)
            assert rate == domain.effective_rate_bp(program, attrs)


def test_scopes_and_bonuses_survive_the_wire():
    rules = parse_rules(
        b"""
city: testcity
name: Test City
region: east
voucher_prefix: TC
programs:
  - id: tc-1
    kind: compute
    budget_cny: 1000000
    rate_percent: 50
    max_rate_percent: 65
    face_value_cny: {min: 1000, max: 2000}
    valid_days: 30
    review: auto
    eligibility: {all_of: [{registered_in: testcity}]}
    bonuses:
      - when: {government_run: true}
        add_percent: 10
      - when: {chip_origin: domestic}
        add_percent: 10
    datacenters: {hub_region: west, exclude: [guian-gov-02]}
"""
    )
    (summary,) = published(rules)
    body = ProgramPublishedSchema().load(
        {
            "event_id": "e",
            "city": "testcity",
            "occurred_at": "2026-01-01T00:00:00Z",
            "programs": [summary],
        }
    )
    program = body["programs"][0]
    assert program["max_rate_bp"] == 6500
    assert program["datacenters"] == {"hub_region": "west", "exclude": ["guian-gov-02"]}
    terms = registry_terms("testcity", program).terms
    west_gov_domestic = DATACENTERS[0][1]
    assert effective_rate_bp(terms, west_gov_domestic) == 6500  # capped
    for dc_id, attrs in itertools.product(
        ["guian-gov-01", "guian-gov-02"], [west_gov_domestic]
    ):
        assert terms.datacenters.admits(dc_id, attrs) == (dc_id == "guian-gov-01")
