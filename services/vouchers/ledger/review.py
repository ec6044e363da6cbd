"""The review queue (DESIGN.md §9): held records listed, released or refused.

A record is held on arrival (``arrival.hold_on_arrival``: nothing booked) or
after it was booked (``clawback.hold_booked``: its booking reversed at once).
A release books through the batch's own path (``booking._Batch``), so the
voucher's status, balance, grace and corrections rule it as they rule any
arrival; a release the voucher can no longer pay is a refusal, listed and
published like any. Each record is decided once. Every decision is a
``usage_decisions`` row (actor, reason); every fact an outbox event,
published after the commit. Clawbacks are in ``clawback``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common.contracts import UsageRatedSchema, event_id
from services.common.errors import Conflict, InvalidRequest, NotFound
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger import booking, lookups
from services.vouchers.ledger.decisions import record_decision
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.redemptions import (
    RELEASE,
    USAGE,
    RedemptionRow,
    job_of,
    redeemed_event,
    redeemed_event_id,
    refused_event_id,
)
from services.vouchers.ledger.sql import locked, writing
from services.vouchers.models import HeldUsage, OutboxEvent, RejectedUsage, Voucher

_RATED = UsageRatedSchema()


def decide_held(
    session: Session,
    rules,
    datacenter_id: str,
    record_id: str,
    decision: str,
    reason: str,
    actor: str,
) -> tuple[HeldUsage, list[OutboxEvent]]:
    """Release (book, if the voucher still can) or refuse a held record, once.

    ``Conflict not_held`` when it was decided already: releasing twice books
    once. A release the voucher can no longer pay (revoked, expired past its
    grace, spent, or the record replaced by a correction) is a refusal with
    that reason.
    """
    if decision not in domain.REVIEW_DECISIONS:
        raise InvalidRequest(
            "invalid_decision",
            "decision must be release or refuse",
            {"decision": [decision]},
        )
    now = utcnow()
    with writing(session):
        try:
            held, events = _decide(
                session, rules, (datacenter_id, record_id), decision, reason, actor, now
            )
            session.commit()
        except IntegrityError:
            session.rollback()
            raise Conflict(
                "not_held", f"{datacenter_id}/{record_id} was decided meanwhile"
            ) from None
        except BaseException:
            session.rollback()
            raise
    return held, events


def _decide(session, rules, key, decision, reason, actor, now):
    held = session.execute(
        locked(
            session,
            select(HeldUsage).where(
                HeldUsage.datacenter_id == key[0], HeldUsage.record_id == key[1]
            ),
        )
    ).scalar_one_or_none()
    if held is None:
        raise NotFound("held_usage_not_found", f"{key[0]}/{key[1]} is not held")
    if held.status != domain.HELD:
        raise Conflict(
            "not_held", f"{key[0]}/{key[1]} is {held.status}", {"status": held.status}
        )
    events: list[OutboxEvent] = []
    booked, problem = 0, None
    if decision == domain.RELEASE:
        held.status = domain.RELEASED
        session.flush()  # the batch's lookups no longer see it held
        if held.record is not None:
            booked, problem, events = _release_arrival(session, rules, held)
        elif lookups.record_rows(session, key):
            booked, problem, events = _release_booked(session, rules, held, now)
        # else: its record has not arrived; it is booked as any when it does
    if decision == domain.REFUSE or problem is not None:
        if not any(event.event == "usage_refused" for event in events):
            events.append(
                _refuse(session, rules.city, held, problem, reason, actor, now)
            )
        verdict = domain.REFUSED
    else:
        verdict = domain.RELEASED
    held.status = verdict
    held.decided_at, held.decided_by = now, actor
    held.decision_reason = (reason if problem is None else f"{problem}: {reason}")[:512]
    record_decision(
        session,
        key,
        held.voucher_code,
        verdict,
        actor,
        held.decision_reason,
        booked,
        None,
        now,
    )
    events.append(
        write_event(
            session,
            rules.city,
            "usage_released",
            event_id("usage_released", rules.city, *key),
            record_id=key[1],
            datacenter_id=key[0],
            voucher_code=held.voucher_code,
            decision=verdict,
            subsidy_fen=booked,
            actor=actor,
            reason=held.decision_reason,
        )
    )
    return held, events


def _release_arrival(session, rules, held: HeldUsage):
    """Book a record held on arrival as its arrival would have been booked."""
    record = _RATED.load(held.record)
    record["hold"], record["replay"] = None, False
    voucher = session.get(Voucher, held.voucher_code)
    if voucher is not None and voucher.status == domain.ACTIVE:
        # Its other problems the batch names, as on arrival.
        problem = domain.release_problem(
            voucher.status, held.subsidy_fen, voucher.balance_fen
        )
        if problem is not None:
            return 0, problem, []
    batch = booking._Batch(session, rules, [record])
    [outcome] = batch.book()
    if outcome.rejected is not None:  # refused: its rejection is written
        return 0, outcome.rejected, list(outcome.events)
    usage = [row for row in outcome.redemptions if row.kind == USAGE]
    events = [redeemed_event(session, rules.city, row) for row in outcome.redemptions]
    return sum(row.subsidy_fen for row in usage), None, events


def _release_booked(session, rules, held: HeldUsage, now: datetime):
    """Book again a record whose booking its hold reversed."""
    key = (held.datacenter_id, held.record_id)
    batch = booking.locked_batch(session, rules, held.voucher_code)
    voucher = batch.vouchers.get(held.voucher_code)
    rows = lookups.record_rows(session, key)
    usage = next((row for row in rows if row.kind == USAGE), None)
    if usage is None or lookups.replaced_by_correction(session, key):
        return 0, domain.SUPERSEDED, []
    budget = batch.programs[voucher.program_id]
    amount = min(held.subsidy_fen, voucher.balance_fen, budget.committed_fen)
    problem = domain.release_problem(voucher.status, held.subsidy_fen, amount)
    if problem is not None:
        return 0, problem, []
    row = RedemptionRow(
        key[0],
        key[1],
        RELEASE,
        key[1],
        None,
        voucher.code,
        voucher.program_id,
        usage.gpu_seconds,
        usage.cost_fen,
        usage.rate_bp,
        amount,
        redeemed_event_id(rules.city, *key, RELEASE),
        # the time of its ledger entries (batch._redeem's): a monthly
        # statement puts the row and its postings in the same month
        batch.now,
        *job_of(usage),
    )
    batch._redeem(voucher, budget, row)
    batch.write()
    return amount, None, [redeemed_event(session, rules.city, row)]


def _refuse(session, city, held: HeldUsage, problem, reason, actor, now) -> OutboxEvent:
    """A held record refused: a refusal like any (listed, published)."""
    why = problem or held.reason
    detail = f"refused on review by {actor}: {reason}"
    session.add(
        RejectedUsage(
            datacenter_id=held.datacenter_id,
            record_id=held.record_id,
            voucher_code=held.voucher_code,
            reason=why,
            detail=detail[:512],
            received_at=now,
        )
    )
    return write_event(
        session,
        city,
        "usage_refused",
        refused_event_id(city, held.datacenter_id, held.record_id),
        record_id=held.record_id,
        datacenter_id=held.datacenter_id,
        voucher_code=held.voucher_code,
        reason=why,
        detail=detail[:512],
    )


def list_held(
    session: Session, status: str | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """One page of held records (``status``: held, released, refused; None:
    all), oldest first, with their evidence and what they would book."""
    if not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidRequest("invalid_page", "limit must be between 1 and 1000")
    if not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("invalid_page", "offset must be ≥ 0")
    if status is not None and status not in domain.HELD_STATUSES:
        raise InvalidRequest(
            "invalid_status", f"status must be one of {', '.join(domain.HELD_STATUSES)}"
        )
    where = [] if status is None else [HeldUsage.status == status]
    rows = session.scalars(
        select(HeldUsage)
        .where(*where)
        .order_by(HeldUsage.held_at, HeldUsage.id)
        .limit(limit)
        .offset(offset)
    ).all()
    total = session.scalar(select(func.count()).select_from(HeldUsage).where(*where))
    session.rollback()
    return [held_view(row) for row in rows], total


def held_view(row: HeldUsage) -> dict[str, Any]:
    record = row.record or {}
    return {
        "datacenter_id": row.datacenter_id,
        "record_id": row.record_id,
        "voucher_code": row.voucher_code,
        "program_id": row.program_id,
        "reason": row.reason,
        "evidence": row.evidence,
        "retroactive": row.retroactive,
        "tenant_id": record.get("tenant_id"),
        "gpu_model": record.get("gpu_model"),
        "started_at": record.get("started_at"),
        "ended_at": record.get("ended_at"),
        "gpu_seconds": row.gpu_seconds,
        "cost_fen": row.cost_fen,
        "subsidy_fen": row.subsidy_fen,
        "status": row.status,
        "held_at": row.held_at,
        "decided_at": row.decided_at,
        "decided_by": row.decided_by,
        "decision_reason": row.decision_reason,
    }
