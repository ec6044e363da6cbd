"""A voucher's monthly statement (issue 17) on SQLite: the month's bounds,
the figures composed from postings, and a history over two months (issue and
a job last month; a job, a clawback and a revocation this month) whose every
figure is checked against the ledger's own postings, to the fen."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from services.common.errors import InvalidRequest, NotFound
from services.common.units import format_gpu_hours, month_bounds, month_of, utcnow
from services.vouchers import domain, ledger
from services.vouchers.ledger.clawback import claw_back
from services.vouchers.ledger.statements import compose
from services.vouchers.models import Binding, LedgerEntry, Redemption, Voucher
from tests.support.vouchers_books import issue


def _utc(year, month):
    return datetime(year, month, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "month, start, end",
    [
        ("2026-03", _utc(2026, 3), _utc(2026, 4)),
        ("2025-12", _utc(2025, 12), _utc(2026, 1)),
    ],
)
def test_a_month_is_its_utc_calendar_month(month, start, end):
    assert month_bounds(month) == (start, end)


@pytest.mark.parametrize(
    "month", ["2026-13", "2026-00", "2026-3", "26-03", "2026-03-01", "", None, 202603]
)
def test_a_malformed_month_is_invalid_month(month):
    with pytest.raises(InvalidRequest) as err:
        month_bounds(month)
    assert err.value.code == "invalid_month"


def test_gpu_hours_are_rounded_half_up_from_integer_seconds():
    assert [format_gpu_hours(s) for s in (0, 3600, 5400, 17, 18, -5400)] == [
        "0.00",
        "1.00",
        "1.50",
        "0.00",
        "0.01",
        "-1.50",
    ]


def _row(kind, subsidy, cost, record_id="r-1", seconds=3600):
    return {
        "record_id": record_id,
        "datacenter_id": "dc-a",
        "kind": kind,
        "gpu_seconds": seconds,
        "cost_fen": cost,
        "rate_bp": 7000,
        "subsidy_fen": subsidy,
    }


def test_compose_adds_the_lines_up_to_the_postings():
    rows = [
        _row("usage", 700, 1000),
        _row("usage", 350, 500, "r-2", 1800),
        _row("clawback", -700, -1000, seconds=-3600),
    ]
    releases = [{"reference": "revoked:X", "amount_fen": 8950, "created_at": None}]
    statement = compose(
        {"face": 10000},
        {"redeemed": 350, "released": 8950},
        rows,
        releases,
    )
    assert statement["opening_balance_fen"] == 10000
    assert statement["closing_balance_fen"] == 700
    assert [line["company_pays_fen"] for line in statement["jobs"]] == [300, 150]
    assert statement["clawbacks"][0]["subsidy_fen"] == -700
    assert statement["releases"][0]["reason"] == "revoked"
    assert statement["totals"] == {
        "jobs": 2,
        "gpu_seconds": 5400,
        "gpu_hours": "1.50",
        "cost_fen": 1500,
        "subsidies_fen": 1050,
        "company_pays_fen": 450,
        "clawbacks_fen": 700,
        "released_fen": 8950,
        "issued_fen": 0,
    }
    assert statement["reconciled"] is True


def test_compose_says_when_the_lines_do_not_match_the_postings():
    statement = compose({"face": 10000}, {"redeemed": 701}, [_row("usage", 700, 1)], [])
    assert statement["reconciled"] is False


def _month_start(moment):
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _date_everything_back(session, code, then):
    """Everything the books hold so far happened at ``then``."""
    session.execute(update(Voucher).where(Voucher.code == code).values(issued_at=then))
    session.execute(update(Binding).values(authorised_at=then, updated_at=then))
    session.execute(update(Redemption).values(booked_at=then))
    session.execute(update(LedgerEntry).values(created_at=then))
    session.commit()


def _postings(session, code):
    """(created_at, column, amount) of every posting on the voucher."""
    rows = session.execute(
        select(LedgerEntry.created_at, LedgerEntry.account, LedgerEntry.amount_fen)
        .where(LedgerEntry.account.like(f"voucher:{code}:%"))
        .order_by(LedgerEntry.id)
    ).all()
    session.rollback()
    return [(at, account.rsplit(":", 1)[1], amount) for at, account, amount in rows]


def _balance_before(postings, moment):
    sign = {"face": 1, "redeemed": -1, "released": -1}
    return sum(sign[c] * amount for at, c, amount in postings if at < moment)


def test_statements_of_two_months_reconcile_to_the_postings(
    books, city_rules, make_usage
):
    now = utcnow()
    this_month = _month_start(now)
    last_month = _month_start(this_month - timedelta(days=1))
    then = last_month + timedelta(days=3)
    code = issue(books, city_rules, face_fen=1000_00).voucher.code
    job_a = make_usage(
        code, 20_000, started_at=then, ended_at=then + timedelta(hours=2)
    )
    job_a.update(gpu_count=2, gpu_seconds=14_400, gpu_model="A800")
    _date_everything_back(books, code, then - timedelta(days=1))
    ledger.book_usage(books, city_rules, job_a)
    _date_everything_back(books, code, then)
    job_b = make_usage(code, 10_001)
    ledger.book_usage(books, city_rules, job_b)
    claw_back(books, city_rules, "dc-a", job_a["record_id"], "idle GPUs", "admin")
    ledger.revoke(books, city_rules, code, "left the city", "admin")
    postings = _postings(books, code)
    issued = ledger.monthly_statement(books, city_rules, code, month_of(last_month))
    current = ledger.monthly_statement(books, city_rules, code, month_of(now))

    # last month: issued, one job
    assert issued["opening_balance_fen"] == 0
    assert issued["totals"]["issued_fen"] == 1000_00
    [line] = issued["jobs"]
    assert line["record_id"] == job_a["record_id"]
    assert (line["tenant_id"], line["gpu_model"], line["gpu_count"]) == (
        "tenant-1",
        "A800",
        2,
    )
    assert (line["started_at"], line["ended_at"]) == (then, then + timedelta(hours=2))
    assert (line["gpu_seconds"], line["gpu_hours"]) == (14_400, "4.00")
    subsidy_a = line["subsidy_fen"]
    assert subsidy_a == domain.subsidy_fen(20_000, line["rate_bp"], 1000_00, 10**12)
    assert line["company_pays_fen"] == 20_000 - subsidy_a
    assert issued["closing_balance_fen"] == 1000_00 - subsidy_a
    # this month: a job, job A clawed back, the rest released on revocation
    assert current["opening_balance_fen"] == issued["closing_balance_fen"]
    [line_b] = current["jobs"]
    subsidy_b = line_b["subsidy_fen"]
    [clawed] = current["clawbacks"]
    assert (clawed["record_id"], clawed["kind"]) == (job_a["record_id"], "clawback")
    assert clawed["subsidy_fen"] == -subsidy_a and clawed["tenant_id"] == "tenant-1"
    [release] = current["releases"]
    assert release["reason"] == "revoked"
    assert release["released_fen"] == 1000_00 - subsidy_b
    assert current["closing_balance_fen"] == 0
    # every figure against the postings themselves
    for statement, start in ((issued, last_month), (current, this_month)):
        end = month_bounds(statement["month"])[1]
        totals = statement["totals"]
        assert statement["opening_balance_fen"] == _balance_before(postings, start)
        assert statement["closing_balance_fen"] == _balance_before(postings, end)
        during = [(c, a) for at, c, a in postings if start <= at < end]
        assert totals["issued_fen"] == sum(a for c, a in during if c == "face")
        assert totals["subsidies_fen"] - totals["clawbacks_fen"] == sum(
            a for c, a in during if c == "redeemed"
        )
        assert totals["released_fen"] == sum(a for c, a in during if c == "released")
        assert (
            statement["opening_balance_fen"]
            + totals["issued_fen"]
            - totals["subsidies_fen"]
            + totals["clawbacks_fen"]
            - totals["released_fen"]
            == statement["closing_balance_fen"]
        )
        assert statement["reconciled"] is True
    assert current["totals"]["clawbacks_fen"] == subsidy_a
    assert current["company_name"] == "Deep Thought AI"
    assert current["city"] == city_rules.city


def test_no_statement_before_the_issue_or_after_this_month(books, city_rules):
    code = issue(books, city_rules, tenants=()).voucher.code
    now = utcnow()
    before = month_of(_month_start(now) - timedelta(days=1))
    after = month_of(_month_start(now) + timedelta(days=32))
    for month in (before, after):
        with pytest.raises(NotFound) as err:
            ledger.monthly_statement(books, city_rules, code, month)
        assert err.value.code == "month_out_of_range"
        assert err.value.details["first"] == err.value.details["last"] == month_of(now)
    with pytest.raises(InvalidRequest) as err:
        ledger.monthly_statement(books, city_rules, code, "2026/01")
    assert err.value.code == "invalid_month"
    with pytest.raises(NotFound) as err:
        ledger.monthly_statement(books, city_rules, "TC-AAAAAAAAAAAA-0", month_of(now))
    assert err.value.code == "voucher_not_found"


def test_another_company_learns_nothing_not_even_the_months(books, city_rules):
    voucher = issue(books, city_rules, tenants=()).voucher
    month = month_of(utcnow())
    for asked in (month, "2001-01"):
        with pytest.raises(NotFound) as err:
            ledger.monthly_statement(
                books, city_rules, voucher.code, asked, company_id="91310000X"
            )
        assert err.value.code == "voucher_not_found" and not err.value.details
    mine = ledger.monthly_statement(
        books, city_rules, voucher.code, month, company_id=voucher.company_id
    )
    assert mine["opening_balance_fen"] == 0
