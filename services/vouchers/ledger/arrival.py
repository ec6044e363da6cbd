"""What review decides as a record arrives, in the batch that books it.

A record metering rated with a hold, or one whose ``usage_hold`` came first,
books nothing: it is held (``held_usage``, ``usage_held``) with what it would
book, and waits for review (``review``). An operator's replay of a refused
record forgets the refusal, once, so that the batch decides it again; booked
now, its ``usage_released`` tells the refusal's listing that it is resolved.
``booking._Batch`` calls these; they write into its transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from services.common.contracts import UsageRatedSchema, event_id
from services.vouchers import domain
from services.vouchers.ledger.decisions import (
    HOLD,
    METERING,
    REPLAY,
    REPLAYED,
    record_decision,
)
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.redemptions import BookingOutcome, Key
from services.vouchers.models import (
    HeldUsage,
    OutboxEvent,
    Program,
    RejectedUsage,
    UsageDecision,
    Voucher,
)

_RATED = UsageRatedSchema()


def forget_refusals(
    session: Session, replays: Mapping[Key, str], now: datetime
) -> dict[Key, str]:
    """Forget the refusals of replayed records, so that they are decided again.

    ``replays``: record → the replay's usage_rated event id. A replay is
    applied once (a redelivered one finds its ``replayed`` decision); a
    record held or reviewed is decided by review alone, never by a replay;
    a booked one stays booked. Returns the records whose refusal was
    forgotten (→ the replay's id, which names the refusal should it come
    again). The refusal is kept in ``usage_decisions``."""
    forgotten = {}
    for key, ref in replays.items():
        dc, record_id = key
        done = session.scalar(
            select(func.count()).where(
                UsageDecision.datacenter_id == dc,
                UsageDecision.record_id == record_id,
                UsageDecision.action == REPLAYED,
                UsageDecision.reference == ref,
            )
        )
        reviewed = session.scalar(
            select(func.count()).where(
                HeldUsage.datacenter_id == dc, HeldUsage.record_id == record_id
            )
        )
        refusal = session.scalars(
            select(RejectedUsage).where(
                RejectedUsage.datacenter_id == dc, RejectedUsage.record_id == record_id
            )
        ).first()
        if done or reviewed or refusal is None:
            continue
        session.execute(delete(RejectedUsage).where(RejectedUsage.id == refusal.id))
        record_decision(
            session,
            key,
            refusal.voucher_code,
            REPLAYED,
            REPLAY,
            f"{refusal.reason}: {refusal.detail}",
            0,
            ref,
            now,
        )
        forgotten[key] = ref
    return forgotten


def replayed_event(batch, key: Key, code: str, subsidy: int) -> OutboxEvent:
    """``usage_released`` of a replayed record booked now that the city had
    refused: the refusal's listing (the registry's) learns that it is
    resolved, as a held record's does when released."""
    return write_event(
        batch.session,
        batch.rules.city,
        "usage_released",
        event_id("usage_released", batch.rules.city, *key, batch.replayed[key]),
        record_id=key[1],
        datacenter_id=key[0],
        voucher_code=code,
        decision=domain.RELEASED,
        subsidy_fen=subsidy,
        actor=REPLAY,
        reason="booked on replay",
    )


def _would_book(program, budget: Program, voucher: Voucher, record) -> tuple[int, int]:
    """(rate, subsidy) the record would book now, as ``_Batch._book_one`` does."""
    attributes = record.get("datacenter") or {}
    rate_bp = (
        domain.effective_rate_bp(program, attributes)
        if program is not None
        else budget.rate_bp
    )
    subsidy = domain.subsidy_fen(
        record["cost_fen"], rate_bp, voucher.balance_fen, budget.committed_fen
    )
    return rate_bp, subsidy


def wire_record(record: Mapping[str, Any], city: str, now: datetime) -> dict[str, Any]:
    """A loaded usage_rated as JSON, without its hold (booked as is on release)."""
    body = _RATED.dump({"city": city, "occurred_at": now, **record})
    body.pop("hold", None)
    body.pop("replay", None)
    return body


def hold_on_arrival(
    batch, record, voucher: Voucher, budget: Program, program, hold
) -> BookingOutcome:
    """Hold a record that passed every check: nothing booked, ``usage_held``."""
    session, city, now = batch.session, batch.rules.city, batch.now
    key = (record["datacenter_id"], record["record_id"])
    _rate, subsidy = _would_book(program, budget, voucher, record)
    facts = {
        "voucher_code": voucher.code,
        "program_id": voucher.program_id,
        "record": wire_record(record, city, now),
        "retroactive": False,
        "gpu_seconds": record["gpu_seconds"],
        "cost_fen": record["cost_fen"],
        "subsidy_fen": subsidy,
    }
    if key in batch.awaiting:  # its usage_hold came first: the row is there
        session.execute(
            HeldUsage.__table__.update()
            .where(
                HeldUsage.datacenter_id == key[0],
                HeldUsage.record_id == key[1],
                HeldUsage.status == domain.HELD,
            )
            .values(**facts)
        )
    else:
        session.add(
            HeldUsage(
                datacenter_id=key[0],
                record_id=key[1],
                reason=hold["reason"],
                evidence=dict(hold.get("evidence") or {}),
                status=domain.HELD,
                held_at=now,
                **facts,
            )
        )
        record_decision(
            session,
            key,
            voucher.code,
            HOLD,
            METERING,
            hold["reason"],
            subsidy,
            record["event_id"],
            now,
        )
    event = held_event(session, city, key, voucher.code, hold, subsidy)
    return BookingOutcome(held=hold["reason"], events=(event,))


def held_event(session, city, key: Key, code, hold, subsidy: int) -> OutboxEvent:
    """The ``usage_held`` of a record held on arrival or after booking."""
    return write_event(
        session,
        city,
        "usage_held",
        event_id("usage_held", city, *key),
        record_id=key[1],
        datacenter_id=key[0],
        voucher_code=code,
        reason=hold["reason"],
        subsidy_fen=subsidy,
        evidence=dict(hold.get("evidence") or {}),
    )
