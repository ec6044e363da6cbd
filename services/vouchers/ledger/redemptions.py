"""The rows a booking writes and what it answers, shared by booking and review.

The kinds of ``redemptions`` row and which of them book a subsidy;
``RedemptionRow``, a row booked now or found booked before; ``BookingOutcome``,
what became of one rated record; and the ids of the events they publish, which
are derived from the record, so that a redelivery publishes the same ids again.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

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


REDEMPTION_COLUMNS = tuple(f.name for f in fields(RedemptionRow))


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
