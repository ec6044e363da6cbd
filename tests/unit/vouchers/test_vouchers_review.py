"""Review and clawback on the city's books (SQLite): holds book nothing, a
release books once, a refusal and a clawback are entries, and the books
balance (invariants 1, 2, 6) after every step; refusals are published."""

import pytest
from sqlalchemy import select

from services.common.errors import Conflict, InvalidRequest, NotFound
from services.vouchers import domain, ledger
from services.vouchers.ledger.clawback import claw_back, hold_booked
from services.vouchers.ledger.review import decide_held, list_held
from services.vouchers.models import OutboxEvent, UsageDecision
from tests.support.vouchers_books import issue, program_row
from tests.support.vouchers_data import usage

HOLD = {
    "reason": "over_capacity",
    "evidence": {"hour": "2026-11-22T06:00:00Z", "inventory": 8},
}


@pytest.fixture
def code(books, city_rules):
    return issue(books, city_rules).voucher.code


def balanced(books):
    assert ledger.check_ledger(books) == []


def voucher(books, code):
    row = ledger.get_voucher(books, code)[0]
    return row


def outbox(books, event):
    rows = books.scalars(select(OutboxEvent).where(OutboxEvent.event == event)).all()
    books.rollback()
    return [row.body for row in rows]


def decisions(books):
    rows = books.scalars(select(UsageDecision).order_by(UsageDecision.id)).all()
    books.rollback()
    return [(row.action, row.actor) for row in rows]


def test_a_refused_record_is_published_once_with_a_stable_id(books, city_rules):
    record = usage("TC-AAAAAAAAAAAA-0", 10_000)
    [first] = ledger.book_usage_batch(books, city_rules, [record])
    [again] = ledger.book_usage_batch(books, city_rules, [record])
    assert first.rejected == domain.UNKNOWN_VOUCHER and len(first.events) == 1
    assert again.duplicate and again.events == ()
    [event] = outbox(books, "usage_refused")
    assert event["event_id"] == first.events[0].event_id
    assert (event["record_id"], event["reason"]) == (
        record["record_id"],
        domain.UNKNOWN_VOUCHER,
    )


def test_a_replay_decides_a_refusal_again_and_books_once(books, city_rules, code):
    ledger.revoke(books, city_rules, code, "by mistake", "admin")
    other = issue(books, city_rules).voucher.code
    record = usage(other, 10_000)
    wrong = dict(record, voucher_code=code)
    [refused] = ledger.book_usage_batch(books, city_rules, [wrong])
    assert refused.rejected == domain.VOUCHER_REVOKED
    # Replayed (as metering re-sends it, with its own event id), now right.
    replay = dict(record, replay=True, event_id="replay-1")
    [booked] = ledger.book_usage_batch(books, city_rules, [replay])
    assert booked.rejected is None and booked.redemptions
    [released] = booked.events
    assert (released.event, released.body["actor"]) == ("usage_released", "replay")
    [again] = ledger.book_usage_batch(books, city_rules, [replay])
    [later] = ledger.book_usage_batch(
        books, city_rules, [dict(replay, event_id="replay-2")]
    )
    assert again.duplicate and later.duplicate
    assert voucher(books, other).redeemed_fen == booked.redemptions[0].subsidy_fen
    assert ("replayed", "replay") in decisions(books)
    balanced(books)


def test_a_replay_refused_again_publishes_a_new_refusal(books, city_rules):
    record = usage("TC-AAAAAAAAAAAA-0", 10_000)
    [first] = ledger.book_usage_batch(books, city_rules, [record])
    replay = dict(record, replay=True, event_id="replay-1")
    [second] = ledger.book_usage_batch(books, city_rules, [replay])
    [third] = ledger.book_usage_batch(books, city_rules, [replay])  # redelivered
    assert second.rejected == domain.UNKNOWN_VOUCHER and not second.duplicate
    assert second.events[0].event_id != first.events[0].event_id
    assert third.duplicate and third.events == ()
    assert len(outbox(books, "usage_refused")) == 2


def test_a_held_record_books_nothing_until_released_once(books, city_rules, code):
    before = program_row(books).redeemed_fen
    record = usage(code, 10_000, hold=HOLD)
    [held] = ledger.book_usage_batch(books, city_rules, [record])
    assert held.held == "over_capacity" and held.redemptions == ()
    [again] = ledger.book_usage_batch(books, city_rules, [record])
    assert again.duplicate and again.held == "over_capacity"
    assert voucher(books, code).redeemed_fen == 0
    [event] = outbox(books, "usage_held")
    assert event["subsidy_fen"] == 8_000 and event["evidence"] == HOLD["evidence"]
    items, total = list_held(books, "held", 10, 0)
    assert total == 1 and items[0]["evidence"] == HOLD["evidence"]
    assert items[0]["tenant_id"] == record["tenant_id"]
    _, lines, _ = ledger.list_redemptions(books, code, 10, 0)
    assert [line["status"] for line in lines] == ["held"]
    balanced(books)

    row, events = decide_held(
        books, city_rules, "dc-a", record["record_id"], "release", "checked", "ops"
    )
    assert row.status == domain.RELEASED
    assert {e.event for e in events} == {"voucher_redeemed", "usage_released"}
    assert voucher(books, code).redeemed_fen == 8_000
    assert program_row(books).redeemed_fen == before + 8_000
    with pytest.raises(Conflict):
        decide_held(
            books, city_rules, "dc-a", record["record_id"], "release", "again", "ops"
        )
    [redelivered] = ledger.book_usage_batch(books, city_rules, [record])
    assert redelivered.duplicate and redelivered.redemptions
    assert voucher(books, code).redeemed_fen == 8_000
    _, lines, _ = ledger.list_redemptions(books, code, 10, 0)
    assert [line["status"] for line in lines] == ["booked"]
    balanced(books)


def test_a_held_record_refused_is_a_refusal(books, city_rules, code):
    record = usage(code, 10_000, hold=HOLD)
    ledger.book_usage_batch(books, city_rules, [record])
    row, events = decide_held(
        books, city_rules, "dc-a", record["record_id"], "refuse", "idle GPUs", "ops"
    )
    assert row.status == domain.REFUSED and row.decided_by == "ops"
    assert {e.event for e in events} == {"usage_refused", "usage_released"}
    [released] = outbox(books, "usage_released")
    assert (released["decision"], released["subsidy_fen"]) == ("refused", 0)
    [again] = ledger.book_usage_batch(books, city_rules, [record])
    assert again.rejected == "over_capacity" and not again.redemptions
    # A replay never undoes a review's refusal.
    replay = dict(record, hold=None, replay=True, event_id="replay-1")
    [replayed] = ledger.book_usage_batch(books, city_rules, [replay])
    assert replayed.rejected == "over_capacity"
    assert voucher(books, code).redeemed_fen == 0
    assert decisions(books) == [("held", "metering"), ("refused", "ops")]
    balanced(books)


def test_a_release_the_voucher_cannot_pay_is_refused(books, city_rules, code):
    record = usage(code, 10_000, hold=HOLD)
    ledger.book_usage_batch(books, city_rules, [record])
    ledger.revoke(books, city_rules, code, "fraud", "admin")
    row, events = decide_held(
        books, city_rules, "dc-a", record["record_id"], "release", "ok", "ops"
    )
    assert row.status == domain.REFUSED
    assert row.decision_reason.startswith(domain.VOUCHER_REVOKED)
    assert [e.event for e in events] == ["usage_refused", "usage_released"]
    balanced(books)


def test_a_hold_after_booking_reverses_it_until_released(books, city_rules, code):
    record = usage(code, 10_000)
    ledger.book_usage_batch(books, city_rules, [record])
    assert voucher(books, code).redeemed_fen == 8_000
    hold = {
        "event_id": "hold-1",
        "record_id": record["record_id"],
        "datacenter_id": "dc-a",
        "voucher_code": code,
        "hold": {"reason": "double_claim", "evidence": {"records": ["other"]}},
    }
    events = hold_booked(books, city_rules, hold)
    assert [e.event for e in events] == ["voucher_redeemed", "usage_held"]
    assert events[0].body["subsidy_fen"] == -8_000
    assert voucher(books, code).redeemed_fen == 0
    assert hold_booked(books, city_rules, hold) == []  # redelivered
    _, lines, _ = ledger.list_redemptions(books, code, 10, 0)
    assert [line["status"] for line in lines] == ["booked", "held"]
    balanced(books)
    decide_held(
        books, city_rules, "dc-a", record["record_id"], "release", "fine", "ops"
    )
    assert voucher(books, code).redeemed_fen == 8_000
    balanced(books)


def test_a_hold_before_its_record_holds_the_record(books, city_rules, code):
    record = usage(code, 10_000)
    hold = {
        "event_id": "hold-1",
        "record_id": record["record_id"],
        "datacenter_id": "dc-a",
        "voucher_code": code,
        "hold": HOLD,
    }
    assert hold_booked(books, city_rules, hold) == []
    [held] = ledger.book_usage_batch(books, city_rules, [record])
    assert held.held == "over_capacity" and not held.redemptions
    items, _ = list_held(books, None, 10, 0)
    assert items[0]["subsidy_fen"] == 8_000 and items[0]["evidence"] == HOLD["evidence"]
    balanced(books)


def test_a_clawback_reverses_with_entries(books, city_rules, code):
    row = program_row(books)
    before = (row.redeemed_fen, row.committed_fen)
    record = usage(code, 10_000)
    ledger.book_usage_batch(books, city_rules, [record])
    result, events = claw_back(
        books, city_rules, "dc-a", record["record_id"], "ghost job", "ops", code
    )
    assert result["clawed_back_fen"] == 8_000
    assert [e.event for e in events] == ["voucher_redeemed", "voucher_clawed_back"]
    assert events[0].body["subsidy_fen"] == -8_000
    assert voucher(books, code).redeemed_fen == 0
    row = program_row(books)
    assert (row.redeemed_fen, row.committed_fen) == before
    with pytest.raises(Conflict):
        claw_back(books, city_rules, "dc-a", record["record_id"], "x", "ops")
    _, lines, _ = ledger.list_redemptions(books, code, 10, 0)
    assert [line["status"] for line in lines] == ["booked", "clawed_back"]
    assert ("clawed_back", "ops") in decisions(books)
    balanced(books)


def test_a_clawback_of_a_closed_voucher_releases_to_the_budget(books, city_rules, code):
    record = usage(code, 10_000)
    ledger.book_usage_batch(books, city_rules, [record])
    ledger.revoke(books, city_rules, code, "fraud", "admin")
    claw_back(books, city_rules, "dc-a", record["record_id"], "fraud", "ops")
    row = voucher(books, code)
    assert (row.redeemed_fen, row.released_fen) == (0, 100_000)
    balanced(books)


def test_a_correction_after_a_clawback_reverses_nothing(books, city_rules, code):
    record = usage(code, 10_000)
    ledger.book_usage_batch(books, city_rules, [record])
    claw_back(books, city_rules, "dc-a", record["record_id"], "wrong", "ops")
    fixed = usage(code, 5_000, correction_of=record["record_id"])
    [outcome] = ledger.book_usage_batch(books, city_rules, [fixed])
    assert [r.kind for r in outcome.redemptions] == [ledger.USAGE]
    assert voucher(books, code).redeemed_fen == 4_000
    balanced(books)


def test_what_is_not_there_or_not_asked_right_is_refused(books, city_rules, code):
    with pytest.raises(NotFound):
        claw_back(books, city_rules, "dc-a", "nope", "r", "ops")
    with pytest.raises(NotFound):
        decide_held(books, city_rules, "dc-a", "nope", "release", "r", "ops")
    with pytest.raises(InvalidRequest):
        decide_held(books, city_rules, "dc-a", "nope", "maybe", "r", "ops")
    with pytest.raises(InvalidRequest):
        list_held(books, "bogus", 10, 0)
    record = usage(code, 10_000)
    ledger.book_usage_batch(books, city_rules, [record])
    other = issue(books, city_rules).voucher.code
    with pytest.raises(NotFound):  # not on that voucher
        claw_back(books, city_rules, "dc-a", record["record_id"], "r", "o", other)
