"""A voucher's monthly statements on the real service (issue 17): RabbitMQ,
PostgreSQL (migrated to 0008), the city's container.

A job last month, a job this month and last month's job clawed back this
month: both statements over RPC, every figure checked against the ledger's
postings read straight from the database, and the closing balance against
the voucher's own balance, to the fen.
"""

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.common.errors import InvalidRequest, NotFound
from services.common.units import month_bounds, month_of, parse_ts, utcnow
from services.vouchers.models import LedgerEntry, Redemption
from tests.integration import test_vouchers_service as city_service
from tests.support.bus import drain
from tests.support.vouchers_books import consent_by_rpc
from tests.support.vouchers_data import EAST_COMMERCIAL as COMMERCIAL
from tests.support.vouchers_data import (
    application,
    credit_code,
    publish_usage_rated,
    rated,
)

pytestmark = pytest.mark.integration

# The city's container and its database, as its service tests start them.
rules_file = city_service.rules_file
start_container = city_service.start_container
start_city = city_service.start_city
engine = city_service.engine
_events = city_service._events

SIGN = {"face": 1, "redeemed": -1, "released": -1}


def _month_start(moment):
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _postings(db, code):
    with Session(db) as session:
        rows = session.execute(
            select(LedgerEntry.created_at, LedgerEntry.account, LedgerEntry.amount_fen)
            .where(LedgerEntry.account.like(f"voucher:{code}:%"))
            .order_by(LedgerEntry.id)
        ).all()
    return [(at, account.rsplit(":", 1)[1], amount) for at, account, amount in rows]


def _balance_before(postings, moment):
    return sum(SIGN[column] * amount for at, column, amount in postings if at < moment)


def _booked_last_month(db, issued_at, booked_at):
    """What the books hold so far was issued and booked last month."""
    with Session(db) as session:
        session.execute(update(Redemption).values(booked_at=booked_at))
        session.execute(
            update(LedgerEntry)
            .where(LedgerEntry.reference.like("issue:%"))
            .values(created_at=issued_at)
        )
        session.execute(
            update(LedgerEntry)
            .where(LedgerEntry.reference.not_like("issue:%"))
            .values(created_at=booked_at)
        )
        session.commit()


def test_two_months_of_statements_reconcile_to_the_ledger(
    start_city, federation, engine, vouchers_db
):
    city = start_city()
    connection, simple = federation
    now = utcnow()
    this_month = _month_start(now)
    last_month = _month_start(this_month - timedelta(days=1))
    then = last_month + timedelta(days=2)
    holder = credit_code(917_001)
    code = city.apply(application(registration_id=holder))["voucher"]["code"]
    # issued, and its tenants authorised, the day before ``then``
    consent_by_rpc(city, vouchers_db, code, ago=now - then + timedelta(days=1))
    job_a = rated(
        code,
        "stmt-a",
        100_000,
        COMMERCIAL,
        started_at=then,
        ended_at=then + timedelta(hours=1),
        gpu_count=2,
        gpu_seconds=7200,
    )
    publish_usage_rated(connection, job_a)
    drain(simple, lambda m: _events(m, "voucher_redeemed"))
    _booked_last_month(engine, then - timedelta(days=1), then + timedelta(hours=2))
    publish_usage_rated(connection, rated(code, "stmt-b", 40_001, COMMERCIAL))
    drain(simple, lambda m: _events(m, "voucher_redeemed"))
    clawed = city.claw_back("dc-test-01", "stmt-a", "GPUs idle", "officer-1", code)
    assert clawed["status"] == "clawed_back"

    earlier = city.monthly_statement(code, month_of(last_month))
    current = city.monthly_statement(code, month_of(now))
    postings = _postings(engine, code)

    [line_a] = earlier["jobs"]
    assert line_a["record_id"] == "stmt-a" and line_a["datacenter_id"] == "dc-test-01"
    assert (line_a["tenant_id"], line_a["gpu_model"], line_a["gpu_count"]) == (
        "tenant-1",
        "H800",
        2,
    )
    assert abs(parse_ts(line_a["started_at"]) - then) < timedelta(seconds=1)
    assert (line_a["gpu_seconds"], line_a["gpu_hours"]) == (7200, "2.00")
    assert line_a["cost_fen"] == 100_000
    assert line_a["company_pays_fen"] == 100_000 - line_a["subsidy_fen"]
    assert earlier["totals"]["issued_fen"] == earlier["face_value_fen"]
    assert earlier["opening_balance_fen"] == 0
    [line_b] = current["jobs"]
    assert line_b["record_id"] == "stmt-b" and line_b["cost_fen"] == 40_001
    [claw] = current["clawbacks"]
    assert (claw["record_id"], claw["kind"]) == ("stmt-a", "clawback")
    assert claw["subsidy_fen"] == -line_a["subsidy_fen"]
    assert current["totals"]["clawbacks_fen"] == clawed["clawed_back_fen"]
    assert current["opening_balance_fen"] == earlier["closing_balance_fen"]
    assert current["closing_balance_fen"] == city.get_voucher(code)["balance_fen"]

    for statement in (earlier, current):
        start, end = month_bounds(statement["month"])
        totals = statement["totals"]
        during = [(c, a) for at, c, a in postings if start <= at < end]
        assert statement["opening_balance_fen"] == _balance_before(postings, start)
        assert statement["closing_balance_fen"] == _balance_before(postings, end)
        assert totals["issued_fen"] == sum(a for c, a in during if c == "face")
        assert totals["released_fen"] == sum(a for c, a in during if c == "released")
        assert totals["subsidies_fen"] - totals["clawbacks_fen"] == sum(
            a for c, a in during if c == "redeemed"
        )
        assert (
            statement["opening_balance_fen"]
            + totals["issued_fen"]
            - totals["subsidies_fen"]
            + totals["clawbacks_fen"]
            - totals["released_fen"]
            == statement["closing_balance_fen"]
        )
        assert statement["reconciled"] is True
        assert statement["company_id"] == holder

    before_issue = month_of(last_month - timedelta(days=1))
    with pytest.raises(NotFound) as err:
        city.monthly_statement(code, before_issue)
    assert err.value.code == "month_out_of_range"
    with pytest.raises(NotFound) as err:
        city.monthly_statement(code, month_of(this_month + timedelta(days=32)))
    assert err.value.code == "month_out_of_range"
    with pytest.raises(InvalidRequest) as err:
        city.monthly_statement(code, "last month")
    assert err.value.code == "invalid_month"
    with pytest.raises(NotFound) as err:
        city.monthly_statement(code, month_of(now), credit_code(917_002))
    assert err.value.code == "voucher_not_found"
    mine = city.monthly_statement(code, month_of(now), holder)
    assert mine["closing_balance_fen"] == current["closing_balance_fen"]
