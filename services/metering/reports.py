"""metering's read side (RPC): usage overview and figures over the rollups,
usage by tenant and by hour of a data centre, dead letters and their replay."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from services.common.errors import InvalidRequest, NotFound
from services.common.units import format_ts, utcnow
from services.metering import dead_letters, ingest
from services.metering.domain import rollups
from services.metering.models import (
    CapacityReport,
    DeadLetter,
    MeteredDatacenter,
    UsageRollup,
    UsageTotal,
)
from services.metering.registry import CachedRegistry
from services.metering.store import as_utc

FIGURE_WINDOWS = {"24h": 24, "7d": 24 * 7}

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

    The window is ``[now − window_hours, now]``. A record's GPU-seconds are
    spread over the hours its span covers (``rollups.spread_over_hours``); an
    hourly bucket is in the window when its hour starts in it. Capacity
    follows ``rollups.capacity_gpu_seconds``.

    Utilisation compares like with like: when a data centre's capacity reports
    begin inside the window (a new data centre, or a network just started),
    usage and capacity are both counted from the hour of its first report, and
    that report's capacity stands from the start of its hour. Otherwise hours
    of usage before any report would be divided by minutes of capacity.
    ``gpu_seconds_window`` is all the usage in the window;
    ``gpu_seconds_covered`` the part that utilisation compares with capacity.
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
            "gpu_seconds_covered": 0,
            "capacity_gpu_seconds_window": 0,
            "utilisation_window": None,
        }
    )
    # Kept at ingest (usage_totals): one row per data centre and stripe, not
    # every rollup ever written.
    totals = session.execute(
        select(
            UsageTotal.datacenter_id,
            func.sum(UsageTotal.gpu_seconds),
            func.sum(UsageTotal.records),
            func.sum(UsageTotal.cost_fen),
        ).group_by(UsageTotal.datacenter_id)
    )
    for datacenter_id, gpu_seconds, records, cost_fen in totals:
        row = rows[datacenter_id]
        row["gpu_seconds_total"] = int(gpu_seconds or 0)
        row["records_total"] = int(records or 0)
        row["cost_fen_total"] = int(cost_fen or 0)
    hourly: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    window = session.execute(
        select(
            UsageRollup.datacenter_id,
            UsageRollup.hour,
            func.sum(UsageRollup.gpu_seconds),
        )
        .where(UsageRollup.hour >= rollups.hour_of(start), UsageRollup.hour <= now)
        .group_by(UsageRollup.datacenter_id, UsageRollup.hour)
    )
    for datacenter_id, hour, gpu_seconds in window:
        hourly[datacenter_id].append((as_utc(hour), int(gpu_seconds or 0)))

    covered_from: dict[str, datetime] = {}
    for datacenter_id, (capacity_seconds, first_at, first_total) in _capacity(
        session, start, now
    ).items():
        if first_at > start:  # reports began inside the window
            since = max(rollups.hour_of(first_at), start)
            covered_from[datacenter_id] = rollups.hour_of(since)
            capacity_seconds += first_total * int((first_at - since).total_seconds())
        rows[datacenter_id]["capacity_gpu_seconds_window"] = capacity_seconds
    for datacenter_id, buckets in hourly.items():
        since_hour = covered_from.get(datacenter_id)
        rows[datacenter_id]["gpu_seconds_window"] = sum(s for _, s in buckets)
        rows[datacenter_id]["gpu_seconds_covered"] = sum(
            seconds
            for hour, seconds in buckets
            if since_hour is None or hour >= since_hour
        )
    for row in rows.values():
        row["utilisation_window"] = rollups.utilisation(
            row["gpu_seconds_covered"], row["capacity_gpu_seconds_window"]
        )
    return {"datacenters": dict(sorted(rows.items()))}


Capacity = dict[str, tuple[int, datetime, int]]


def _capacity(session: Session, start: datetime, now: datetime) -> Capacity:
    """Per data centre with reports in the window: ``rollups.capacity_gpu_seconds``
    over ``[start, now]``, and the first report's time and total GPUs.

    Data centres report every 5 minutes: nationally 288 000 reports a day.
    PostgreSQL sums the slices itself (a window function gives each report its
    successor) and sends one row per data centre; reading every report into
    Python took ~2 s for 24 h of 1 000 data centres, longer than the registry
    waits. SQLite, the one-machine default, walks them in Python; both give
    the same figures (tests/integration/test_metering_capacity.py).
    """
    if session.get_bind().dialect.name == "postgresql":
        return _capacity_summed(session, start, now)
    return _capacity_walked(session, start, now)


def _capacity_summed(session: Session, start: datetime, now: datetime) -> Capacity:
    low = start - rollups.CAPACITY_SLICE
    rows = session.execute(_CAPACITY_SQL, {"low": low, "start": start, "now": now})
    return {
        dc: (int(seconds), as_utc(first_at), int(first_total))
        for dc, seconds, first_at, first_total in rows
    }


def _capacity_walked(session: Session, start: datetime, now: datetime) -> Capacity:
    low = start - rollups.CAPACITY_SLICE
    series: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    reports = session.execute(
        select(
            CapacityReport.datacenter_id,
            CapacityReport.reported_at,
            CapacityReport.total_gpus,
        )
        .where(CapacityReport.reported_at >= low, CapacityReport.reported_at <= now)
        .order_by(CapacityReport.datacenter_id, CapacityReport.reported_at)
    )
    for datacenter_id, reported_at, total_gpus in reports:
        series[datacenter_id].append((as_utc(reported_at), int(total_gpus)))
    return {
        dc: (rollups.capacity_gpu_seconds(reports, start, now), *reports[0])
        for dc, reports in series.items()
    }


# rollups.capacity_gpu_seconds in SQL: each report stands from its time until
# the next report, at most CAPACITY_SLICE, at most now; only the part after
# start counts; whole seconds, truncated, per slice.
_SLICE_S = int(rollups.CAPACITY_SLICE.total_seconds())
_CAPACITY_SQL = text(
    f"""
    SELECT datacenter_id,
           sum(CASE WHEN until > since
                    THEN total_gpus * floor(extract(epoch FROM until - since))
                    ELSE 0 END),
           min(reported_at),
           min(first_total)
    FROM (
        SELECT datacenter_id, reported_at, total_gpus,
               first_value(total_gpus) OVER w AS first_total,
               least(coalesce(lead(reported_at) OVER w, :now),
                     reported_at + interval '{_SLICE_S} seconds',
                     :now) AS until,
               greatest(reported_at, :start) AS since
        FROM capacity_reports
        WHERE reported_at >= :low AND reported_at <= :now
        WINDOW w AS (PARTITION BY datacenter_id ORDER BY reported_at)
    ) AS slices
    GROUP BY datacenter_id
    """
)


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
            # extensions: the last replay, if any
            "replayed_at": letter.replayed_at and format_ts(as_utc(letter.replayed_at)),
            "replay_outcome": letter.replay_outcome,
            "replay_reason": letter.replay_reason,
        }
        for letter in letters
    ]


def replay_dead_letter(
    session: Session, registry: CachedRegistry, dead_letter_id: Any
) -> tuple[dict[str, Any], list[ingest.Outgoing]]:
    """Run a stored dead letter through every rule again.

    ``applied`` when it now passes (stored and rated, or already stored with
    the same body), ``dead_letter`` with the reason when it is still refused.
    The dead letter stays, marked with the replay's time and outcome; a
    replay never creates a second dead letter.
    """
    if isinstance(dead_letter_id, bool) or not isinstance(dead_letter_id, int):
        raise InvalidRequest("invalid_dead_letter_id", "an integer id is expected")
    letter = session.get(DeadLetter, dead_letter_id)
    if letter is None:
        raise NotFound("dead_letter_not_found", f"no dead letter {dead_letter_id}")
    message = dead_letters.replayable(letter)
    session.rollback()
    outcome = ingest.process_batch(session, registry, [message], store_refused=False)
    letter = session.get(DeadLetter, dead_letter_id)
    if outcome.refused:
        result = {"outcome": "dead_letter", "reason": outcome.refused[0][1].reason}
    else:
        result = {"outcome": "applied", "reason": None}
    letter.replayed_at = utcnow()
    letter.replay_outcome = result["outcome"]
    letter.replay_reason = result["reason"]
    session.commit()
    return result, outcome.outgoing


def _window_start(window_hours: int, now: datetime) -> datetime:
    return rollups.hour_of(now - timedelta(hours=window_hours))


def usage_by_tenant(
    session: Session,
    datacenter_id: str,
    window_hours: int = 24,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """A data centre's usage per tenant, city and voucher in the window."""
    window_hours = _window_hours(window_hours)
    now = now or utcnow()
    rows = session.execute(
        select(
            UsageRollup.tenant_id,
            UsageRollup.city,
            UsageRollup.voucher_code,
            func.sum(UsageRollup.records),
            func.sum(UsageRollup.gpu_seconds),
            func.sum(UsageRollup.cost_fen),
        )
        .where(
            UsageRollup.datacenter_id == datacenter_id,
            UsageRollup.hour >= _window_start(window_hours, now),
            UsageRollup.hour <= now,
        )
        .group_by(UsageRollup.tenant_id, UsageRollup.city, UsageRollup.voucher_code)
        .order_by(UsageRollup.tenant_id, UsageRollup.city, UsageRollup.voucher_code)
    )
    return [
        {
            "tenant_id": tenant_id,
            "city": city or None,
            "voucher_code": voucher_code or None,
            "records": int(records or 0),
            "gpu_seconds": int(gpu_seconds or 0),
            "cost_fen": int(cost_fen or 0),
        }
        for tenant_id, city, voucher_code, records, gpu_seconds, cost_fen in rows
    ]


def usage_by_hour(
    session: Session,
    datacenter_id: str | None,
    window_hours: int = 24,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """A data centre's usage per hour in the window (hours without usage left
    out); with ``datacenter_id`` None, the whole network's, in one query."""
    window_hours = _window_hours(window_hours)
    now = now or utcnow()
    query = (
        select(
            UsageRollup.hour,
            func.sum(UsageRollup.records),
            func.sum(UsageRollup.gpu_seconds),
            func.sum(UsageRollup.cost_fen),
        )
        .where(
            UsageRollup.hour >= _window_start(window_hours, now),
            UsageRollup.hour <= now,
        )
        .group_by(UsageRollup.hour)
        .order_by(UsageRollup.hour)
    )
    if datacenter_id is not None:
        query = query.where(UsageRollup.datacenter_id == datacenter_id)
    rows = session.execute(query)
    return [
        {
            "hour": format_ts(as_utc(hour)),
            "records": int(records or 0),
            "gpu_seconds": int(gpu_seconds or 0),
            "cost_fen": int(cost_fen or 0),
        }
        for hour, records, gpu_seconds, cost_fen in rows
    ]


def usage_figures(session: Session, now: datetime | None = None) -> dict[str, Any]:
    """Per data centre and per hub region, over the last 24 h and the last 7 days.

    ``{"datacenters": {dc: {"hub_region", "24h": {...}, "7d": {...}}},
    "regions": {region: {"datacenters", "24h": {...}, "7d": {...}}}}``, each
    window ``{gpu_seconds, capacity_gpu_seconds, utilisation}``; a region's
    utilisation is its data centres' usage over their summed capacity.
    """
    now = now or utcnow()
    regions_of = dict(
        session.execute(
            select(MeteredDatacenter.datacenter_id, MeteredDatacenter.hub_region)
        ).all()
    )
    datacenters: dict[str, dict[str, Any]] = {}
    regions: dict[str, dict[str, Any]] = {}
    for label, hours in FIGURE_WINDOWS.items():
        overview = usage_overview(session, hours, now=now)["datacenters"]
        for dc, row in overview.items():
            region = regions_of.get(dc) or "unknown"
            figures = {
                "gpu_seconds": row["gpu_seconds_window"],
                "capacity_gpu_seconds": row["capacity_gpu_seconds_window"],
                "utilisation": row["utilisation_window"],
            }
            datacenters.setdefault(dc, {"hub_region": region})[label] = figures
            total = regions.setdefault(region, {"datacenters": 0})
            window = total.setdefault(
                label, {"gpu_seconds": 0, "capacity_gpu_seconds": 0, "_covered": 0}
            )
            window["gpu_seconds"] += figures["gpu_seconds"]
            window["capacity_gpu_seconds"] += figures["capacity_gpu_seconds"]
            # each data centre's share capped at its capacity, as its own is
            window["_covered"] += min(
                row["gpu_seconds_covered"], row["capacity_gpu_seconds_window"]
            )
    for row in datacenters.values():
        regions[row["hub_region"]]["datacenters"] += 1
    for total in regions.values():
        for label in FIGURE_WINDOWS:
            window = total[label]
            window["utilisation"] = rollups.utilisation(
                window.pop("_covered"), window["capacity_gpu_seconds"]
            )
    return {
        "datacenters": dict(sorted(datacenters.items())),
        "regions": dict(sorted(regions.items())),
    }
