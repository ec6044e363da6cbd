"""The outbox: federation events written in the transaction of their fact,
published after the commit, and relayed later if a crash came in between."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.common.contracts import make_event
from services.common.units import utcnow
from services.vouchers.ledger.sql import transaction
from services.vouchers.models import OutboxEvent


def write_event(
    session: Session, city: str, event: str, eid: str, **fields: Any
) -> OutboxEvent:
    """Write ``event`` in the current transaction; published after the commit."""
    row = OutboxEvent(
        event_id=eid,
        event=event,
        body=make_event(event, city, eid, **fields),
        created_at=utcnow(),
    )
    session.add(row)
    return row


def pending_events(
    session: Session, limit: int = 500, older_than_s: float = 0.0
) -> list[OutboxEvent]:
    """Outbox events not yet marked published, oldest first.

    ``older_than_s`` leaves the newest to the worker that is publishing them.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    rows = list(
        session.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.published_at.is_(None), OutboxEvent.created_at <= cutoff)
            .order_by(OutboxEvent.id)
            .limit(limit)
        )
    )
    session.rollback()
    return rows


def mark_published(session: Session, ids: list[int]) -> None:
    if not ids:
        return
    with transaction(session):
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(ids), OutboxEvent.published_at.is_(None))
            .values(published_at=utcnow())
        )
