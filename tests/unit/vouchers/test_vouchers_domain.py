"""Eligibility and subsidy rules, without a database."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.vouchers import domain

# The rules of tc-compute's eligibility tree, depth first.
COMPUTE_RULES = [
    "all_of",
    "registered_in: testcity",
    "max_employees: 300",
    "any_of",
    "min_annual_revenue_cny: 5000000",
    "government_research_project: true",
]


def test_eligible_company_is_approved_with_a_reason_per_rule(city_rules, make_company):
    program = city_rules.program("tc-compute")
    decision = domain.decide(program, make_company())
    assert decision.decision == domain.APPROVED
    rules = [r.rule for r in decision.reasons]
    assert rules == COMPUTE_RULES
    by_rule = {r.rule: r for r in decision.reasons}
    assert by_rule["max_employees: 300"].evidence == "employees=40 (at most 300)"
    assert by_rule["any_of"].passed and by_rule["any_of"].evidence == "1 of 2 passed"
    assert not by_rule["government_research_project: true"].passed


def test_every_failed_rule_is_reported(city_rules, make_company):
    applicant = make_company(
        registered_in="beijing", employees=5000, annual_revenue_cny=0
    )
    decision = domain.decide(city_rules.program("tc-compute"), applicant)
    assert decision.decision == domain.REJECTED
    failed = {r.rule for r in decision.reasons if not r.passed}
    assert failed == set(COMPUTE_RULES)


def test_research_project_is_an_alternative_to_revenue(city_rules, make_company):
    applicant = make_company(annual_revenue_cny=None, government_research_project=True)
    decision = domain.decide(city_rules.program("tc-compute"), applicant)
    assert decision.decision == domain.APPROVED
    evidence = {r.rule: r.evidence for r in decision.reasons}
    assert evidence["min_annual_revenue_cny: 5000000"] == "annual_revenue_cny not given"


def test_not_inverts_and_missing_facts_fail():
    rule = domain.Not(domain.Predicate("registered_in", "beijing"))
    assert domain.evaluate(rule, {"registered_in": "shanghai"}).passed
    assert not domain.evaluate(rule, {"registered_in": "beijing"}).passed
    assert not domain.evaluate(domain.Predicate("max_employees", 10), {}).passed


def test_manual_review_programs_are_pending(city_rules, make_company):
    decision = domain.decide(city_rules.program("tc-manual"), make_company())
    assert decision.decision == domain.PENDING_REVIEW


def test_face_value_within_program_range(city_rules):
    program = city_rules.program("tc-compute")
    assert domain.face_value_problem(program, 100_00) is None
    assert domain.face_value_problem(program, 1000_00) is None
    assert "between 100 and 1000 CNY" in domain.face_value_problem(program, 99_99)
    assert domain.face_value_problem(program, 1000_01) is not None


@pytest.mark.parametrize(
    "datacenter, rate_bp",
    [
        (
            {"government_run": False, "chip_origin": "imported", "hub_region": "east"},
            8000,
        ),
        (
            {"government_run": True, "chip_origin": "imported", "hub_region": "east"},
            9000,
        ),
        (
            {"government_run": False, "chip_origin": "domestic", "hub_region": "east"},
            8500,
        ),
        # 80 + 10 + 5 = 95, capped at 90.
        (
            {"government_run": True, "chip_origin": "domestic", "hub_region": "west"},
            9000,
        ),
    ],
)
def test_effective_rate_adds_bonuses_up_to_the_cap(city_rules, datacenter, rate_bp):
    assert (
        domain.effective_rate_bp(city_rules.program("tc-compute"), datacenter)
        == rate_bp
    )


@pytest.mark.parametrize(
    "cost, rate_bp, balance, committed, subsidy",
    [
        (10_000, 8000, 1_000_000, 1_000_000, 8_000),
        (9_999, 8000, 1_000_000, 1_000_000, 7_999),  # 7999.2 rounded down
        (1, 8000, 1_000_000, 1_000_000, 0),  # 0.8 fen rounds down to nothing
        (10_000, 8000, 5_000, 1_000_000, 5_000),  # the balance caps it
        (10_000, 8000, 5_000, 3_000, 3_000),  # the program's commitment caps it
        (0, 8000, 5_000, 5_000, 0),
        (10_000, 8000, 0, 0, 0),
    ],
)
def test_subsidy_arithmetic(cost, rate_bp, balance, committed, subsidy):
    assert domain.subsidy_fen(cost, rate_bp, balance, committed) == subsidy


def test_datacenter_scope(city_rules):
    west = city_rules.program("tc-west").datacenters
    assert west.admits("dc-x", {"hub_region": "west"})
    assert not west.admits("dc-x", {"hub_region": "east"})
    listed = city_rules.program("tc-manual").datacenters
    assert listed.admits("dc-a", {}) and not listed.admits("dc-b", {})


def _problem(program, status, expires_at, started_at, dc, attributes, **times):
    """``usage_problem`` of an hour's record, its tenant authorised the hour
    before it started, decided a second after it ended (``times`` override)."""
    times = {
        "ended_at": started_at + timedelta(hours=1),
        "issued_at": None,
        "authorised_at": started_at - timedelta(hours=1),
        **times,
    }
    times.setdefault("now", times["ended_at"] + timedelta(seconds=1))
    return domain.usage_problem(
        program, status, expires_at, started_at, dc, attributes, **times
    )


def test_usage_problem_reasons(city_rules):
    program = city_rules.program("tc-west")
    now = datetime.now(UTC)
    later = now + timedelta(days=1)
    west = {"hub_region": "west"}
    assert _problem(None, None, None, now, "dc", west) == "unknown_voucher"
    assert _problem(program, "active", now, now, "dc", west) == "voucher_expired"
    assert _problem(program, "expired", later, now, "dc", west) == ("voucher_expired")
    assert _problem(program, "active", later, now, "dc", {"hub_region": "east"}) == (
        "voucher_wrong_datacenter"
    )
    assert _problem(program, "active", later, now, "dc", west) is None


def test_a_company_holds_one_active_voucher_per_program():
    assert domain.active_voucher([]) is None
    closed = [("TC-1", domain.EXPIRED), ("TC-2", domain.REVOKED)]
    assert domain.active_voucher(closed) is None
    assert domain.active_voucher([*closed, ("TC-3", domain.ACTIVE)]) == "TC-3"


def test_a_voucher_expires_valid_days_after_its_issue():
    issued = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    expires = domain.expiry_date(issued, 30)
    assert expires == datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    second = timedelta(seconds=1)
    # Expired from its date on, to the second: usage that started then is
    # refused with the reason the expiry timer gives the voucher.
    assert not domain.expired(expires, expires - second)
    assert domain.expired(expires, expires)
    start = expires - second
    assert (
        _problem(None, domain.ACTIVE, expires, start, "dc", {}, ended_at=expires)
        is None
    )
    assert (
        _problem(None, domain.ACTIVE, expires, expires, "dc", {})
        == domain.VOUCHER_EXPIRED
    )
    # Without grace the timer closes it at its date.
    assert not domain.due_to_expire(domain.ACTIVE, expires, 0, expires - second)
    assert domain.due_to_expire(domain.ACTIVE, expires, 0, expires)
    # A voucher closed already is not closed again.
    assert not domain.due_to_expire(domain.REVOKED, expires, 0, expires + second)
    assert not domain.due_to_expire(domain.EXPIRED, expires, 0, expires + second)


def test_funds_cover_what_is_drawn_from_them():
    assert domain.covers(100_00, 100_00)
    assert domain.covers(100_00, 0)
    assert not domain.covers(100_00, 100_01)
    assert not domain.covers(0, 1)


@given(
    cost=st.integers(0, 10**9),
    rate_bp=st.integers(0, 10_000),
    balance=st.integers(0, 10**9),
    committed=st.integers(0, 10**9),
)
def test_a_subsidy_is_covered_by_the_balance_and_the_commitment(
    cost, rate_bp, balance, committed
):
    subsidy = domain.subsidy_fen(cost, rate_bp, balance, committed)
    assert subsidy >= 0
    assert domain.covers(balance, subsidy) and domain.covers(committed, subsidy)


def test_predicate_table_drives_the_rules_loader():
    # A predicate the domain does not know cannot be written in a rules file.
    assert set(domain.PREDICATES) == {
        "registered_in",
        "max_employees",
        "min_annual_revenue_cny",
        "government_research_project",
        "min_employees",
        "max_annual_revenue_cny",
        "sector_in",
        "founded_after",
        "founded_before",
    }
