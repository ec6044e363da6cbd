"""The ``parked_events`` table every consumer's service has in its own
database (issue 16), and its store: :class:`ParkedEventColumns` for the
model, :func:`create_parked_events_table` for the migration,
:class:`ParkingStore` to write, list and mark parked events. The consumers'
side (counting attempts, parking, the RPC) is ``services/common/parking.py``.
No nameko here: models and migrations import it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, declared_attr, mapped_column

from services.common.errors import InvalidRequest, NotFound
from services.common.sqltypes import UtcDateTime
from services.common.units import format_ts

REASON_WIDTH = 1024
KINDS = ("rejected", "failed")  # parking.REJECTED, parking.FAILED


# -- the table----------------------------------------------------------------


class ParkedEventColumns:
    """The columns of ``parked_events``, mixed into each service's model.

    An event kept whole (its body as text, and for metering the headers that
    carry its signature), with its reason, its attempts and what a replay
    came to: applied, duplicate (applied since) or parked_again.
    """

    __tablename__ = "parked_events"

    @declared_attr.directive
    def __table_args__(cls) -> tuple:
        return (Index("ix_parked_events_parked_at", "parked_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    routing_key: Mapped[str] = mapped_column(String(255))
    event_id: Mapped[str | None] = mapped_column(String(128))
    body: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))  # rejected | failed
    reason: Mapped[str] = mapped_column(String(1024))
    attempts: Mapped[int] = mapped_column(Integer)
    parked_at: Mapped[datetime] = mapped_column(UtcDateTime())
    replayed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # applied | duplicate | parked_again
    outcome: Mapped[str | None] = mapped_column(String(16))


def create_parked_events_table(op: Any, *extra: Any) -> None:
    """The migration of ``parked_events`` (``extra``: a service's own
    columns). Frozen as the first migrations that call it had it: a later
    change to the table is a new migration, never an edit here."""
    import sqlalchemy as sa

    op.create_table(
        "parked_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        *extra,
    )
    op.create_index("ix_parked_events_parked_at", "parked_events", ["parked_at"])


def drop_parked_events_table(op: Any) -> None:
    op.drop_index("ix_parked_events_parked_at", table_name="parked_events")
    op.drop_table("parked_events")


def _page(limit: Any, offset: Any) -> tuple[int, int]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidRequest("invalid_page", "limit must be between 1 and 1000")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("invalid_page", "offset must be ≥ 0")
    return limit, offset


def _clean(text: str) -> str:
    """Text every database takes: no NUL (PostgreSQL refuses it in text)."""
    return text.replace("\x00", "\ufffd")


class ParkingStore:
    """Parked events in a service's database; needs ``session`` and
    ``parked_model`` (its :class:`ParkedEventColumns` model). Each write is
    its own transaction."""

    session: Any
    parked_model: type

    def park(
        self,
        routing_key: str,
        body: bytes,
        event_id: str | None,
        kind: str,
        reason: str,
        attempts: int,
        now: datetime,
        **extra: Any,
    ) -> int:
        """Keep the event whole; its id. ``extra``: the model's own columns."""
        self.session.rollback()  # whatever the failed attempt left behind
        row = self.parked_model(
            routing_key=_clean(routing_key[:255]),
            event_id=_clean(event_id[:128]) if event_id else None,
            body=_clean(body.decode("utf-8", errors="replace")),
            kind=kind,
            reason=_clean(reason[:REASON_WIDTH]),
            attempts=attempts,
            parked_at=now,
            **extra,
        )
        try:
            self.session.add(row)
            self.session.flush()
            parked_id = row.id
            self.session.commit()
        except BaseException:
            self.session.rollback()
            raise
        return parked_id

    def parked_events(
        self, kind: str | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        """One page, newest first; ``kind`` None: both."""
        model = self.parked_model
        limit, offset = _page(limit, offset)
        where = [] if kind is None else [model.kind == kind]
        rows = self.session.scalars(
            select(model)
            .where(*where)
            .order_by(model.parked_at.desc(), model.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        total = self.session.scalar(
            select(func.count()).select_from(model).where(*where)
        )
        found = [parked_view(row) for row in rows]
        self.session.rollback()
        return found, total

    def parked_event(self, parked_id: Any) -> dict[str, Any]:
        """One, with its ``body`` (and the model's own columns)."""
        row = None
        if isinstance(parked_id, int) and not isinstance(parked_id, bool):
            row = self.session.get(self.parked_model, parked_id)
        found = None
        if row is not None:
            found = {
                column.key: getattr(row, column.key) for column in row.__table__.columns
            }
        self.session.rollback()
        if found is None:
            raise NotFound("parked_event_not_found", f"no parked event {parked_id!r}")
        return found

    def mark_parked_replayed(self, parked_id: int, outcome: str, now: datetime) -> None:
        self.session.rollback()
        try:
            row = self.session.get(self.parked_model, parked_id)
            row.replayed_at, row.outcome = now, outcome
            self.session.commit()
        except BaseException:
            self.session.rollback()
            raise


def parked_view(row: Any) -> dict[str, Any]:
    """What a listing shows of one (not its body)."""
    return {
        "id": row.id,
        "routing_key": row.routing_key,
        "event_id": row.event_id,
        "kind": row.kind,
        "reason": row.reason,
        "attempts": row.attempts,
        "parked_at": row.parked_at,
        "replayed_at": row.replayed_at,
        "outcome": row.outcome,
    }


def wire(item: dict[str, Any]) -> dict[str, Any]:
    """A listed item as RPC answers it: times as ISO 8601 with ``Z``."""
    return {
        k: (format_ts(v) if v is not None else None)
        if k in ("parked_at", "replayed_at")
        else v
        for k, v in item.items()
    }
