"""What a city publishes of its programs lets the registry price a voucher's
use exactly as the city will book it: same rate, bonuses, cap and scope."""

import itertools

import pytest

from services.city_registry import domain as registry
from services.common.contracts import ProgramPublishedSchema
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


@pytest.mark.parametrize(
    "city", ["shanghai", "chengdu", "shandong", "beijing", "shenzhen"]
)
def test_the_registry_prices_as_the_city_books(city):
    rules = load_rules(f"deploy/cities/{city}.yaml")
    for program, summary in zip(rules.programs, published(rules), strict=True):
        terms = registry.VoucherTerms(
            city=city,
            program_id=program.id,
            rate_bp=summary["rate_bp"],
            max_rate_bp=summary["max_rate_bp"],
            bonuses=tuple(summary["bonuses"]),
            datacenters=summary["datacenters"],
            terms_published=True,
        )
        for dc_id, attrs in DATACENTERS:
            assert registry.scope_admits(terms.datacenters, dc_id, attrs) == (
                program.datacenters.admits(dc_id, attrs)
            )
            rate, _ = registry.effective_rate(terms, attrs)
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
    terms = registry.VoucherTerms(
        city="testcity",
        program_id="tc-1",
        rate_bp=program["rate_bp"],
        max_rate_bp=program["max_rate_bp"],
        bonuses=tuple(program["bonuses"]),
        datacenters=program["datacenters"],
        terms_published=True,
    )
    west_gov_domestic = DATACENTERS[0][1]
    assert registry.effective_rate(terms, west_gov_domestic)[0] == 6500  # capped
    for dc_id, attrs in itertools.product(
        ["guian-gov-01", "guian-gov-02"], [west_gov_domestic]
    ):
        assert registry.scope_admits(terms.datacenters, dc_id, attrs) == (
            dc_id == "guian-gov-01"
        )
