"""A booked subsidy taken back: a ``usage_hold`` after the booking, a clawback.

Both reverse the row whose subsidy stands through the batch's own path
(``booking.locked_batch``, ``_Batch._reverse``), so that the ledger entries
are the ones a correction writes and ``check_ledger`` holds; entries, never
edits. A held record then waits for review (``review.decide_held``); a
clawback is final. A ``usage_hold`` for a record not yet arrived is kept, and
the record is held when it comes (``arrival.hold_on_arrival``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common.contracts import event_id
from services.common.errors import Conflict, NotFound
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger import lookups
from services.vouchers.ledger.arrival import held_event
from services.vouchers.ledger.booking import locked_batch
from services.vouchers.ledger.decisions import (
    CLAW_BACK,
    HOLD,
    METERING,
    record_decision,
)
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.redemptions import (
    CLAWBACK,
    HOLD_REVERSAL,
    redeemed_event,
)
from services.vouchers.ledger.sql import writing
from services.vouchers.models import HeldUsage, OutboxEvent, RejectedUsage


def hold_booked(session: Session, rules, hold_event: Mapping[str, Any]):
    """``usage_hold``: hold a record metering rated without one.

    Booked: its booking is reversed (``voucher_redeemed`` with the negative
    subsidy) and it waits for review. Not yet arrived: the hold is kept, and
    the record is held when it comes. Refused, held or reviewed already, or
    replaced by a correction: nothing to do. Returns the outbox events.
    """
    key = (hold_event["datacenter_id"], hold_event["record_id"])
    hold = hold_event["hold"]
    now = utcnow()
    with writing(session):
        try:
            events = _hold_booked(session, rules, key, hold_event, hold, now)
            session.commit()
            return events
        except IntegrityError:
            # A competing consumer held or booked it meanwhile: its outcome
            # stands; a redelivery of this hold finds it.
            session.rollback()
            raise
        except BaseException:
            session.rollback()
            raise


def _hold_booked(session, rules, key, hold_event, hold, now) -> list[OutboxEvent]:
    held = session.scalar(
        select(func.count()).where(
            HeldUsage.datacenter_id == key[0], HeldUsage.record_id == key[1]
        )
    )
    refused = session.scalar(
        select(func.count()).where(
            RejectedUsage.datacenter_id == key[0], RejectedUsage.record_id == key[1]
        )
    )
    if held or refused:
        return []
    rows = lookups.record_rows(session, key)
    code = rows[0].voucher_code if rows else hold_event.get("voucher_code")
    if not rows:
        session.add(_held_row(key, code, None, hold, now, retroactive=True))
        record_decision(
            session, key, code, HOLD, METERING, hold["reason"], 0, None, now
        )
        return []
    batch = locked_batch(session, rules, code)
    # Again, under the lock.
    original = lookups.standing_row(lookups.record_rows(session, key))
    if original is None or lookups.replaced_by_correction(session, key):
        return []
    reversal = batch._reverse(original, key[1], HOLD_REVERSAL)
    batch.write()
    row = _held_row(key, code, original.program_id, hold, now, retroactive=True)
    row.gpu_seconds, row.cost_fen = original.gpu_seconds, original.cost_fen
    row.subsidy_fen = original.subsidy_fen
    session.add(row)
    record_decision(
        session,
        key,
        code,
        HOLD,
        METERING,
        hold["reason"],
        original.subsidy_fen,
        hold_event["event_id"],
        now,
    )
    return [
        redeemed_event(session, rules.city, reversal),
        held_event(session, rules.city, key, code, hold, original.subsidy_fen),
    ]


def _held_row(key, code, program_id, hold, now, *, retroactive) -> HeldUsage:
    return HeldUsage(
        datacenter_id=key[0],
        record_id=key[1],
        voucher_code=code,
        program_id=program_id,
        reason=hold["reason"],
        evidence=dict(hold.get("evidence") or {}),
        record=None,
        retroactive=retroactive,
        gpu_seconds=0,
        cost_fen=0,
        subsidy_fen=0,
        status=domain.HELD,
        held_at=now,
    )


def claw_back(
    session: Session,
    rules,
    datacenter_id: str,
    record_id: str,
    reason: str,
    actor: str,
    voucher_code: str | None = None,
) -> tuple[dict[str, Any], list[OutboxEvent]]:
    """Reverse the subsidy booked for a record (entries, never edits).

    ``NotFound redemption_not_found`` when nothing was booked for it (on
    ``voucher_code``, when given); ``Conflict not_booked`` when its subsidy
    no longer stands (clawed back, held, or replaced by a correction).
    """
    key = (datacenter_id, record_id)
    now = utcnow()
    with writing(session):
        try:
            rows = lookups.record_rows(session, key)
            if not rows or voucher_code not in (None, rows[0].voucher_code):
                raise NotFound(
                    "redemption_not_found",
                    f"nothing is booked for {datacenter_id}/{record_id}",
                )
            code = rows[0].voucher_code
            batch = locked_batch(session, rules, code)
            original = lookups.standing_row(lookups.record_rows(session, key))
            if original is None:
                raise Conflict(
                    "not_booked",
                    f"no subsidy stands booked for {datacenter_id}/{record_id}",
                )
            reversal = batch._reverse(original, record_id, CLAWBACK)
            batch.write()
            amount = original.subsidy_fen
            record_decision(
                session, key, code, CLAW_BACK, actor, reason, amount, None, now
            )
            events = [
                redeemed_event(session, rules.city, reversal),
                write_event(
                    session,
                    rules.city,
                    "voucher_clawed_back",
                    event_id("voucher_clawed_back", rules.city, *key),
                    voucher_code=code,
                    record_id=record_id,
                    datacenter_id=datacenter_id,
                    clawed_back_fen=amount,
                    reason=reason,
                    actor=actor,
                ),
            ]
            session.commit()
        except IntegrityError:
            session.rollback()
            raise Conflict(
                "not_booked", f"{datacenter_id}/{record_id} was clawed back already"
            ) from None
        except BaseException:
            session.rollback()
            raise
    result = {
        "datacenter_id": datacenter_id,
        "record_id": record_id,
        "voucher_code": code,
        "clawed_back_fen": amount,
        "status": "clawed_back",
        "actor": actor,
        "reason": reason,
    }
    return result, events
