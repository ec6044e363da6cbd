"""The rows a booking writes and what it answers, shared by booking and review.

The kinds of ``redemptions`` row and which of them book a subsidy;
``RedemptionRow``, a row booked now or found booked before; ``BookingOutcome``,
what became of one rated record; and the ids of the events they publish, which
are derived from the record, so that a redelivery publishes the same ids again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from services.common.contracts import event_id
from services.vouchers.ledger.outbox import write_event
from services.vouchers.models import OutboxEvent

Key = tuple[str, str]  # (datacenter_id, record_id)

USAGE = "usage"
REVERSAL = "reversal"
# Review (ledger/review.py, ledger/clawback.py): a booked record held after
# all, its booking again on release, a clawback. Of a record's rows the last
# one of these or of the two above says whether its subsidy stands
# (domain.standing).
HOLD_REVERSAL = "held"
RELEASE = "released"
CLAWBACK = "clawback"
BOOKING_KINDS = (USAGE, RELEASE)


@dataclass(frozen=True, slots=True)
class RedemptionRow:
    """One row of ``redemptions``, booked now or found booked before."""

    datacenter_id: str
    record_id: str
    kind: str  # usage | reversal
    source_record_id: str  # the record whose arrival wrote the row
    correction_of: str | None
    voucher_code: str
    program_id: str
    gpu_seconds: int
    cost_fen: int
    rate_bp: int
    subsidy_fen: int
    event_id: str
    booked_at: datetime
    # The job, as the rated record named it (migration 0008), for a voucher's
    # monthly statement (ledger/statements.py); a reversal carries its
    # original's. Null on rows booked before 0008.
    tenant_id: str | None = None
    gpu_model: str | None = None
    gpu_count: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


REDEMPTION_COLUMNS = tuple(f.name for f in fields(RedemptionRow))
JOB_COLUMNS = ("tenant_id", "gpu_model", "gpu_count", "started_at", "ended_at")


def job_of(source: Mapping[str, Any] | RedemptionRow) -> tuple:
    """The job columns of a row, from a rated record or the row it reverses."""
    if isinstance(source, RedemptionRow):
        return tuple(getattr(source, name) for name in JOB_COLUMNS)
    return tuple(source.get(name) for name in JOB_COLUMNS)


@dataclass(frozen=True)
class BookingOutcome:
    """What became of one rated record; ``redemptions`` are to be published,
    and ``events`` (outbox rows: its refusal, its hold) after the commit."""

    redemptions: tuple[RedemptionRow, ...] = ()
    rejected: str | None = None
    duplicate: bool = False
    held: str | None = None  # the hold's reason: rated, not booked (review.py)
    events: tuple = ()


def refused_event_id(
    city: str, datacenter_id: str, record_id: str, replay: str | None = None
) -> str:
    """The ``usage_refused`` of a record: one per record, and one per replay
    (``replay``: the replayed usage_rated's event id) that refuses it again."""
    if replay is None:
        return event_id("usage_refused", city, datacenter_id, record_id)
    return event_id("usage_refused", city, datacenter_id, record_id, replay)


def redeemed_event_id(city: str, datacenter_id: str, record_id: str, kind: str) -> str:
    if kind == USAGE:
        return event_id("voucher_redeemed", city, datacenter_id, record_id)
    return event_id("voucher_redeemed", city, datacenter_id, record_id, kind)


def redeemed_event(session, city: str, row: RedemptionRow) -> OutboxEvent:
    """The ``voucher_redeemed`` of a row review books or reverses (outbox)."""
    return write_event(
        session,
        city,
        "voucher_redeemed",
        row.event_id,
        voucher_code=row.voucher_code,
        program_id=row.program_id,
        record_id=row.record_id,
        datacenter_id=row.datacenter_id,
        gpu_seconds=row.gpu_seconds,
        cost_fen=row.cost_fen,
        subsidy_fen=row.subsidy_fen,
    )
