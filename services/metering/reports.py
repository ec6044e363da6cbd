"""metering's read side: the usage overview and the dead-letter listing (RPC)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.common.errors import InvalidRequest
from services.common.units import format_ts, utcnow
from services.metering import domain
from services.metering.ingest import as_utc
from services.metering.models import CapacityReport, DeadLetter, UsageRollup

MAX_WINDOW_HOURS = 24 * 366
MAX_DEAD_LETTERS = 1000


def _window_hours(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("invalid_window", "window_hours must be an integer")
    if not 1 <= value <= MAX_WINDOW_HOURS:
        raise InvalidRequest(
            "invalid_window", f"window_hours must be 1..{MAX_WINDOW_HOURS}"
        )
    return value


def usage_overview(
    session: Session, window_hours: int = 24, now: datetime | None = None
) -> dict[str, Any]:
    """Per data centre: all-time totals, and usage against capacity in the window.

    The window is ``[now − window_hours, now]``. Usage counts by the hour each
    record's span started (the rollup bucket): a bucket is in the window when
    its hour starts in it. Capacity follows ``domain.capacity_gpu_seconds``.
    """
    window_hours = _window_hours(window_hours)
    now = now or utcnow()
    start = now - timedelta(hours=window_hours)
    rows: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "gpu_seconds_total": 0,
            "records_total": 0,
            "cost_fen_total": 0,
            "gpu_seconds_window": 0,
            "capacity_gpu_seconds_window": 0,
            "utilisation_window": None,
        }
    )
    totals = session.execute(
        select(
            UsageRollup.datacenter_id,
            func.sum(UsageRollup.gpu_seconds),
            func.sum(UsageRollup.records),
            func.sum(UsageRollup.cost_fen),
        ).group_by(UsageRollup.datacenter_id)
    )
    for datacenter_id, gpu_seconds, records, cost_fen in totals:
        row = rows[datacenter_id]
        row["gpu_seconds_total"] = int(gpu_seconds or 0)
        row["records_total"] = int(records or 0)
        row["cost_fen_total"] = int(cost_fen or 0)
    window = session.execute(
        select(UsageRollup.datacenter_id, func.sum(UsageRollup.gpu_seconds))
        .where(UsageRollup.hour >= start, UsageRollup.hour <= now)
        .group_by(UsageRollup.datacenter_id)
    )
    for datacenter_id, gpu_seconds in window:
        rows[datacenter_id]["gpu_seconds_window"] = int(gpu_seconds or 0)

    reports: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    capacity = session.execute(
        select(
            CapacityReport.datacenter_id,
            CapacityReport.reported_at,
            CapacityReport.total_gpus,
        )
        .where(
            CapacityReport.reported_at >= start - domain.CAPACITY_SLICE,
            CapacityReport.reported_at <= now,
        )
        .order_by(CapacityReport.datacenter_id, CapacityReport.reported_at)
    )
    for datacenter_id, reported_at, total_gpus in capacity:
        reports[datacenter_id].append((as_utc(reported_at), int(total_gpus)))
    for datacenter_id, series in reports.items():
        rows[datacenter_id]["capacity_gpu_seconds_window"] = (
            domain.capacity_gpu_seconds(series, start, now)
        )
    for row in rows.values():
        row["utilisation_window"] = domain.utilisation(
            row["gpu_seconds_window"], row["capacity_gpu_seconds_window"]
        )
    return {"datacenters": dict(sorted(rows.items()))}


def list_dead_letters(
    session: Session,
    datacenter_id: str | None = None,
    reason: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest dead letters first, filtered by data centre and reason."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidRequest("invalid_limit", "limit must be a positive integer")
    query = select(DeadLetter).order_by(
        DeadLetter.received_at.desc(), DeadLetter.id.desc()
    )
    if datacenter_id is not None:
        query = query.where(DeadLetter.datacenter_id == datacenter_id)
    if reason is not None:
        query = query.where(DeadLetter.reason == reason)
    letters = session.scalars(query.limit(min(limit, MAX_DEAD_LETTERS)))
    return [
        {
            "id": letter.id,
            "datacenter_id": letter.datacenter_id,
            "record_id": letter.record_id,
            "routing_key": letter.routing_key,
            "reason": letter.reason,
            "detail": letter.detail,
            "received_at": format_ts(as_utc(letter.received_at)),
        }
        for letter in letters
    ]
