"""The voucher life on SQLite: review, expiry, revocation, outbox, statements.

And the ledger invariants (DESIGN.md §5, 1, 2, 3 and 6) over random histories
of issue / redeem / correct / redeliver, and of those with expire / revoke.
"""

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from services.common.errors import Conflict, InvalidRequest, NotFound
from services.common.units import apply_rate_fen, utcnow
from services.vouchers import domain, ledger
from services.vouchers.models import OutboxEvent, Program, Voucher
from tests.support.vouchers_books import issue, ledger_examples, program_row
from tests.support.vouchers_data import (
    EAST_COMMERCIAL,
    WEST_GOVERNMENT,
    make_session_factory,
    usage,
)


def outbox(session):
    rows = session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)).all()
    session.rollback()
    return rows


def test_start_announces_programs_once_through_the_outbox(books, city_rules):
    ledger.sync_programs(books, city_rules)  # a restart on the same rules
    rows = outbox(books)
    assert [r.event for r in rows] == ["program_published"]
    assert {p["id"] for p in rows[0].body["programs"]} == {
        "tc-compute",
        "tc-west",
        "tc-manual",
    }


def test_issue_writes_its_event_in_the_same_transaction(books, city_rules):
    result = issue(books, city_rules, tenants=())
    assert [e.event for e in result.events] == ["voucher_issued"]
    pending = ledger.pending_events(books)
    assert [r.event for r in pending] == ["program_published", "voucher_issued"]
    ledger.mark_published(books, [r.id for r in pending])
    assert ledger.pending_events(books) == []


def test_manual_review_approves_or_rejects(books, city_rules):
    pending = issue(books, city_rules, "tc-manual", face_fen=500_00)
    assert pending.application.decision == domain.PENDING_REVIEW
    assert (
        pending.voucher is None and program_row(books, "tc-manual").committed_fen == 0
    )
    approved = ledger.review(
        books, city_rules, pending.application.id, True, "documents ok", "admin-1"
    )
    assert approved.application.decision == domain.APPROVED
    assert approved.voucher.face_value_fen == 500_00
    assert approved.application.reasons[-1] == {
        "rule": "manual_review",
        "passed": True,
        "evidence": "documents ok",
    }
    assert approved.application.reviewed_by == "admin-1"
    with pytest.raises(Conflict) as err:
        ledger.review(books, city_rules, pending.application.id, False, "no", "a")
    assert err.value.code == "application_not_pending"
    other = issue(books, city_rules, "tc-manual", face_fen=500_00)
    rejected = ledger.review(
        books, city_rules, other.application.id, False, "not an SME", "admin-2"
    )
    assert rejected.application.decision == domain.REJECTED and not rejected.voucher
    with pytest.raises(NotFound):
        ledger.review(books, city_rules, "nope", True, "x", "y")
    items, total = ledger.list_applications(books, "pending_review", 10, 0)
    assert total == 0 and items == []
    items, total = ledger.list_applications(books, None, 10, 0)
    assert total == 2
    with pytest.raises(InvalidRequest):
        ledger.list_applications(books, "maybe", 10, 0)
    assert ledger.check_ledger(books) == []


def test_expiry_releases_the_unspent_balance(books, city_rules):
    code = issue(books, city_rules).voucher.code
    ledger.book_usage(books, city_rules, usage(code, 10_000))  # 8 000 redeemed
    assert ledger.expire_due(books, city_rules) == []  # not due yet
    # 30 valid days, then the default 7 days of grace.
    assert ledger.expire_due(books, city_rules, utcnow() + timedelta(days=36)) == []
    later = utcnow() + timedelta(days=38)
    events = ledger.expire_due(books, city_rules, later)
    assert [(e.event, e.body["released_fen"], e.body["reason"]) for e in events] == [
        ("voucher_released", 1000_00 - 8_000, "expired")
    ]
    voucher = books.get(Voucher, code, populate_existing=True)
    books.rollback()
    assert (voucher.status, voucher.balance_fen) == ("expired", 0)
    row = program_row(books)
    assert (row.available_fen, row.committed_fen, row.redeemed_fen) == (
        10_000_00 - 8_000,
        0,
        8_000,
    )
    assert row.released_fen == 1000_00 - 8_000
    assert ledger.expire_due(books, city_rules, later) == []  # once
    # Usage on it is refused with a reason; a new voucher may be issued.
    late = ledger.book_usage(books, city_rules, usage(code, 1_000))
    assert late.rejected == domain.VOUCHER_EXPIRED
    company = books.get(Voucher, code).company_id
    books.rollback()
    assert issue(books, city_rules, registration_id=company).voucher
    assert ledger.check_ledger(books) == []


def test_revocation_releases_and_refuses_later_usage(books, city_rules):
    code = issue(books, city_rules).voucher.code
    original = usage(code, 10_000)
    ledger.book_usage(books, city_rules, original)
    voucher, event = ledger.revoke(books, city_rules, code, "fraud", "admin-1")
    assert voucher.status == "revoked" and voucher.closed_by == "admin-1"
    assert event.body["reason"] == "revoked"
    assert event.body["released_fen"] == 1000_00 - 8_000
    with pytest.raises(Conflict):
        ledger.revoke(books, city_rules, code, "again", "admin-1")
    refused = ledger.book_usage(books, city_rules, usage(code, 1_000))
    assert refused.rejected == domain.VOUCHER_REVOKED
    # A correction for a closed voucher is refused too: the booking stands.
    fixed = usage(code, 5_000, correction_of=original["record_id"])
    assert ledger.book_usage(books, city_rules, fixed).rejected == "voucher_revoked"
    assert ledger.check_ledger(books) == []


def test_correction_moving_usage_off_a_closed_voucher(books, city_rules):
    first = issue(books, city_rules).voucher.code
    second = issue(books, city_rules).voucher.code
    original = usage(first, 10_000)
    ledger.book_usage(books, city_rules, original)
    ledger.revoke(books, city_rules, first, "wrong tenant", "admin")
    # The usage belonged to the other voucher: reversed on the closed one
    # (released to the budget), booked on the active one.
    fixed = usage(second, 10_000, correction_of=original["record_id"])
    outcome = ledger.book_usage(books, city_rules, fixed)
    assert [(r.voucher_code, r.subsidy_fen) for r in outcome.redemptions] == [
        (first, -8_000),
        (second, 8_000),
    ]
    closed = books.get(Voucher, first, populate_existing=True)
    books.rollback()
    assert (closed.redeemed_fen, closed.released_fen, closed.balance_fen) == (
        0,
        1000_00,
        0,
    )
    assert ledger.check_ledger(books) == []


def test_statements_and_totals(books, city_rules):
    code = issue(books, city_rules).voucher.code
    ledger.book_usage(books, city_rules, usage(code, 10_000))
    voucher, entries, total = ledger.voucher_statement(books, code)
    assert [(e["account"].split(":")[-1], e["amount_fen"]) for e in entries] == [
        ("face", 1000_00),
        ("redeemed", 8_000),
    ]
    assert total == 2 and voucher.code == code
    program, entries, total = ledger.program_statement(books, "tc-compute")
    assert sum(e["amount_fen"] for e in entries) == program.budget_fen
    totals = ledger.ledger_totals(books, city_rules)
    compute = next(p for p in totals["programs"] if p["program_id"] == "tc-compute")
    assert compute == {
        "program_id": "tc-compute",
        "budget_fen": 10_000_00,
        "available_fen": 9_000_00,
        "committed_fen": 1000_00 - 8_000,
        "redeemed_fen": 8_000,
        "released_fen": 0,
        "vouchers_issued": 1,
    }
    items, count = ledger.list_vouchers(books, voucher.company_id, "active", 10, 0)
    assert [v.code for v in items] == [code] and count == 1
    with pytest.raises(NotFound):
        ledger.voucher_statement(books, "TC-AAAAAAAAAAAA-0")


# -- The invariants over random histories ---------------------------------

programs = st.sampled_from(["tc-compute", "tc-west"])
faces = st.integers(100, 1000)  # CNY
costs = st.integers(0, 200_000)  # fen
redeem = st.tuples(
    st.just("redeem"),
    st.integers(0, 20),
    costs,
    st.sampled_from([EAST_COMMERCIAL, WEST_GOVERNMENT]),
)
redeliver = st.tuples(st.just("redeliver"), st.integers(0, 50))
# Issue, redeem, correct (on the voucher of the record corrected), redeliver.
histories = st.lists(
    st.one_of(
        st.tuples(st.just("issue"), programs, faces),
        redeem,
        st.tuples(st.just("correct"), st.integers(0, 50), costs),
        redeliver,
    ),
    max_size=30,
)
# And a voucher's end: issue to one of a few companies (so some applications
# meet an active voucher), correct onto any voucher, expire, revoke.
lives = st.lists(
    st.one_of(
        st.tuples(st.just("issue"), programs, faces, st.integers(0, 5)),
        redeem,
        st.tuples(st.just("correct"), st.integers(0, 50), costs, st.integers(0, 20)),
        redeliver,
        st.tuples(st.just("expire"), st.integers(0, 20)),
        st.tuples(st.just("revoke"), st.integers(0, 20)),
    ),
    max_size=35,
)


@ledger_examples(60)
@given(histories)
def test_invariants_hold_over_any_history(city_rules, history):
    replay(city_rules, history)


@ledger_examples(60)
@given(lives)
def test_invariants_hold_over_any_life(city_rules, history):
    replay(city_rules, history)


def replay(city_rules, history):
    """Play ``history`` on new books; the ledger balances after every step, and
    at the end every invariant holds."""
    engine, factory = make_session_factory()
    session = factory()
    booked: dict[str, int] = {}  # record_id → subsidy, from the outcomes
    try:
        ledger.sync_programs(session, city_rules)
        codes, records = [], []
        for op in history:
            kind = op[0]
            if kind == "issue":
                applicant = {"registration_id": f"company-{op[3]}"} if op[3:] else {}
                try:
                    result = issue(session, city_rules, op[1], op[2] * 100, **applicant)
                    codes.append(result.voucher.code)
                except Conflict:
                    pass
                continue
            if not codes:
                continue
            if kind in ("expire", "revoke"):
                code = codes[op[1] % len(codes)]
                if kind == "revoke":
                    try:
                        ledger.revoke(session, city_rules, code, "test", "admin")
                    except Conflict:
                        pass
                else:
                    voucher = session.get(Voucher, code)
                    voucher.expires_at = utcnow() - timedelta(hours=3)
                    session.commit()
                    ledger.expire_due(session, city_rules)
                assert ledger.check_ledger(session) == []
                continue
            if kind == "redeem":
                record = usage(codes[op[1] % len(codes)], op[2], op[3])
            elif kind == "correct":
                if not records:
                    continue
                earlier = records[op[1] % len(records)]
                record = usage(
                    codes[op[3] % len(codes)] if op[3:] else earlier["voucher_code"],
                    op[2],
                    earlier["datacenter"],
                    correction_of=earlier["record_id"],
                )
            else:
                if not records:
                    continue
                record = records[op[1] % len(records)]
            outcome = ledger.book_usage(session, city_rules, record)
            records.append(record)
            for row in outcome.redemptions:
                if row.kind == "usage":
                    # A subsidy never exceeds rate × cost (at the capped rate).
                    assert 0 <= row.subsidy_fen <= apply_rate_fen(row.cost_fen, 9000)
                if not outcome.duplicate:
                    key = f"{row.kind}:{row.record_id}"
                    assert key not in booked  # booked at most once
                    booked[key] = row.subsidy_fen
            assert ledger.check_ledger(session) == []
        # The program's redeemed equals the sum of every booking, independently.
        redeemed = session.scalar(
            select(Program.redeemed_fen).where(Program.id == "tc-compute")
        ) + session.scalar(select(Program.redeemed_fen).where(Program.id == "tc-west"))
        released_back = sum(
            v.face_value_fen - v.redeemed_fen - v.released_fen
            for v in session.scalars(select(Voucher))
        )
        assert released_back >= 0
        reversed_on_closed = 0  # reversals on closed vouchers leave redeemed too
        assert redeemed == sum(booked.values()) - reversed_on_closed
        for row in session.scalars(select(Program)):
            assert (
                row.available_fen + row.committed_fen + row.redeemed_fen
                == row.budget_fen
            )
            assert min(row.available_fen, row.committed_fen, row.redeemed_fen) >= 0
        for voucher in session.scalars(select(Voucher)):
            assert 0 <= voucher.balance_fen <= voucher.face_value_fen
            if voucher.status != "active":
                assert voucher.balance_fen == 0
    finally:
        session.close()
        engine.dispose()
