"""Storing capacity reports: what :func:`services.metering.ingest.process_batch`
writes for the ``<datacenter>.capacity`` messages of a batch.

One report per data centre and ``reported_at``, kept the first time
(``INSERT … ON CONFLICT DO NOTHING RETURNING``); the same report again is a
duplicate, a different one for the same moment a ``conflicting_duplicate``.
Runs inside the batch's transaction; never commits.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.common.units import format_ts, utcnow
from services.metering.domain.validation import Reason, Refused
from services.metering.models import CapacityReport
from services.metering.store import as_utc, insert_for

if TYPE_CHECKING:  # ingest imports this module to store a batch's reports
    from services.metering.ingest import Checked

_CAPACITY = CapacityReport.__table__


def store_capacity(
    session: Session, capacity: list[Checked]
) -> list[tuple[int, Refused]]:
    """Store a batch's checked capacity reports; returns ``(index, why)`` of
    each one refused (a different report for the same data centre and time)."""
    if not capacity:
        return []
    now = utcnow()
    first: dict[tuple[str, datetime], Checked] = {}
    repeats: list[Checked] = []
    for checked in capacity:
        key = (checked.datacenter_id, checked.loaded["reported_at"])
        if key in first:
            repeats.append(checked)
        else:
            first[key] = checked
    rows = [
        {
            "datacenter_id": checked.datacenter_id,
            "reported_at": checked.loaded["reported_at"],
            "received_at": now,
            "report_sha256": checked.digest,
            "total_gpus": sum(gpu["total"] for gpu in checked.loaded["gpus"]),
            "allocated_gpus": sum(gpu["allocated"] for gpu in checked.loaded["gpus"]),
            "gpus": [dict(gpu) for gpu in checked.loaded["gpus"]],
        }
        for _key, checked in sorted(first.items())
    ]
    statement = (
        insert_for(session)(_CAPACITY)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["datacenter_id", "reported_at"])
        .returning(_CAPACITY.c.datacenter_id, _CAPACITY.c.reported_at)
    )
    inserted = {(dc, as_utc(at)) for dc, at in session.execute(statement)}
    refusals = []
    for checked in [*first.values(), *repeats]:
        key = (checked.datacenter_id, checked.loaded["reported_at"])
        if key in inserted and first[key] is checked:
            continue
        stored = (
            first[key].digest
            if key in inserted
            else session.scalar(
                select(_CAPACITY.c.report_sha256).where(
                    _CAPACITY.c.datacenter_id == key[0],
                    _CAPACITY.c.reported_at == key[1],
                )
            )
        )
        if stored != checked.digest:
            refusals.append(
                (
                    checked.index,
                    Refused(
                        Reason.CONFLICTING_DUPLICATE,
                        f"a different capacity report for {format_ts(key[1])}"
                        " was stored before",
                    ),
                )
            )
    return refusals
