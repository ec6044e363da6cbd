"""Holds: which rated records are not to be subsidised until reviewed (no I/O).

DESIGN.md §9, "inventory and capacity". A record that passes every rule is
rated and stored; it is *held* (``usage_rated.hold``, or ``usage_hold`` when
it was announced without one) when

- **over_capacity**: per data centre, GPU model and UTC hour (a *bucket*),
  each record's GPU-seconds are apportioned to the hours of its
  ``[started_at, ended_at)`` (:func:`hour_shares`); in the canonical order
  ``(started_at, record_id)`` the records whose cumulative sum exceeds the
  registered count × 3 600 are held (:func:`over_capacity`). A record held
  in any of its hours is held.
- **double_claim**: a record naming ``gpu_uuids`` overlaps in time another
  record of the same data centre naming one of the same GPUs: both are held
  (:func:`double_claims`). A correction and the record it corrects never
  claim against each other.

Both rules are functions of the *set* of records that count (a record
replaced by a correction stops counting), never of their arrival order, and
both are monotone: adding a record never unholds another. So deciding them
batch by batch, each batch seeing every record committed before it (the
locks of ``services.metering.holds``), ends in the same held set as deciding
them once over all the records, whatever the order and the batches. A hold,
once made, stays until a reviewer releases it (a correction that takes load
off a bucket does not unhold what it held).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from services.common.units import format_ts
from services.metering.domain.rollups import spread_over_hours

OVER_CAPACITY = "over_capacity"
DOUBLE_CLAIM = "double_claim"
SECONDS_PER_HOUR = 3600
_HOUR = timedelta(hours=1)


class Claim(NamedTuple):
    """One record's share of one bucket, in the canonical order's key order."""

    started_at: datetime
    record_id: str
    gpu_seconds: int


class GpuSpan(NamedTuple):
    """What :func:`double_claims` knows of a record naming GPUs."""

    record_id: str
    started_at: datetime
    ended_at: datetime
    gpu_uuids: frozenset[str]
    correction_of: str | None = None


def utc(moment: datetime) -> datetime:
    """Stored times are UTC (SQLite hands them back naive)."""
    tzinfo = moment.tzinfo
    if tzinfo is UTC:  # a loaded record's (parse_ts): nearly always
        return moment
    if tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def hour_shares(
    gpu_seconds: int, started_at: datetime, ended_at: datetime
) -> list[tuple[datetime, int]]:
    """A record's GPU-seconds per UTC hour of its span, pro rata, exact.

    The rounding is the rollups' (``rollups.spread_over_hours``): the share
    of the hours up to each boundary is ``⌊gpu_seconds × elapsed / span⌋``
    and each hour gets the difference of two such cumulative shares, so the
    parts always sum to ``gpu_seconds`` and each is within one second of its
    exact value. An hour with a share of 0 is left out.
    """
    started_at = utc(started_at)
    hour = started_at.replace(minute=0, second=0, microsecond=0)
    ended_at = utc(ended_at)
    if ended_at <= hour + _HOUR:  # within one hour: all of it there
        return [(hour, gpu_seconds)] if gpu_seconds > 0 else []
    spread = spread_over_hours(gpu_seconds, started_at, ended_at)
    return [(hour, share) for hour, share in spread if share > 0]


def capacity_of(registered: int) -> int:
    """GPU-seconds a bucket holds: the registered count of the model × 3 600."""
    return registered * SECONDS_PER_HOUR


def over_capacity(claims: Iterable[Claim], capacity: int) -> set[str]:
    """The record ids held in one bucket: in the canonical order
    ``(started_at, record_id)``, each record whose cumulative sum of
    GPU-seconds (its own included) exceeds ``capacity``."""
    held: set[str] = set()
    total = 0
    for claim in sorted(claims):
        total += claim.gpu_seconds
        if total > capacity:
            held.add(claim.record_id)
    return held


def newly_over(
    claims: Iterable[Claim],
    new: set[tuple[datetime, str]],
    before: int,
    capacity: int,
) -> list[str]:
    """:func:`over_capacity` of a bucket one batch added to, told
    incrementally: ``claims`` are the bucket's from the earliest new one on
    (``new``: their ``(started_at, record_id)``), ``before`` the sum of the
    claims before those. Returns the ids over the line that were not over it
    before the batch (a new claim; or an older one the new ones pushed over):
    those already over were held by the batch that put them there.
    """
    total = old = before
    over = []
    for claim in sorted(claims):
        total += claim.gpu_seconds
        fresh = (claim.started_at, claim.record_id) in new
        if not fresh:
            old += claim.gpu_seconds
        if total > capacity and (fresh or old <= capacity):
            over.append(claim.record_id)
    return over


def overlap(a: GpuSpan, b: GpuSpan) -> bool:
    """Two records claim a GPU at the same time: their spans intersect
    (half-open: one ending as the other starts does not) and they share a
    GPU, and neither is a correction of the other."""
    if a.record_id == b.record_id:
        return False
    if a.correction_of == b.record_id or b.correction_of == a.record_id:
        return False
    return (
        a.started_at < b.ended_at
        and b.started_at < a.ended_at
        and not a.gpu_uuids.isdisjoint(b.gpu_uuids)
    )


def double_claims(spans: Iterable[GpuSpan]) -> dict[str, set[str]]:
    """``{record_id: the ids of the records it double-claims with}`` for every
    record of ``spans`` (one data centre) that overlaps another
    (:func:`overlap`). Pairs are found through the GPUs they name, so the cost
    is that of the records sharing a GPU, not of all pairs."""
    by_gpu: dict[str, list[GpuSpan]] = defaultdict(list)
    for span in spans:
        for uuid in span.gpu_uuids:
            by_gpu[uuid].append(span)
    found: dict[str, set[str]] = defaultdict(set)
    for sharing in by_gpu.values():
        sharing.sort()
        for n, a in enumerate(sharing):
            for b in sharing[n + 1 :]:
                if overlap(a, b):
                    found[a.record_id].add(b.record_id)
                    found[b.record_id].add(a.record_id)
    return dict(found)


def capacity_hold(
    datacenter_id: str,
    gpu_model: str,
    hour: datetime,
    registered: int,
    bucket_gpu_seconds: int,
) -> dict[str, Any]:
    """The ``HoldSchema`` of an over_capacity hold, with its evidence."""
    return {
        "reason": OVER_CAPACITY,
        "evidence": {
            "datacenter_id": datacenter_id,
            "gpu_model": gpu_model,
            "hour": format_ts(hour),
            "inventory": registered,
            "capacity_gpu_seconds": capacity_of(registered),
            "bucket_gpu_seconds": bucket_gpu_seconds,
        },
    }


def double_claim_hold(others: Iterable[str], gpu_uuids: Iterable[str]) -> dict:
    """The ``HoldSchema`` of a double_claim hold: the other records, the GPUs."""
    return {
        "reason": DOUBLE_CLAIM,
        "evidence": {
            "records": sorted(set(others)),
            "gpu_uuids": sorted(set(gpu_uuids)),
        },
    }


def held_set(
    records: Iterable[Mapping[str, Any]], registered: Mapping[tuple[str, str], int]
) -> set[str]:
    """The reference: the ids held among ``records`` (all of one data centre
    or many, none corrected) decided at once. What the batch-by-batch
    decisions of ``services.metering.holds`` must end in (the tests say so).
    """
    records = list(records)
    buckets: dict[tuple[str, str, datetime], list[Claim]] = defaultdict(list)
    for row in records:
        for hour, share in hour_shares(
            row["gpu_seconds"], row["started_at"], row["ended_at"]
        ):
            key = (row["datacenter_id"], row["gpu_model"], hour)
            buckets[key].append(Claim(utc(row["started_at"]), row["record_id"], share))
    held: set[str] = set()
    for (dc, model, _hour), claims in buckets.items():
        held |= over_capacity(claims, capacity_of(registered[(dc, model)]))
    by_dc: dict[str, list[GpuSpan]] = defaultdict(list)
    for row in records:
        if row.get("gpu_uuids"):
            by_dc[row["datacenter_id"]].append(span_of(row))
    for spans in by_dc.values():
        held |= set(double_claims(spans))
    return held


def span_of(row: Mapping[str, Any]) -> GpuSpan:
    return GpuSpan(
        row["record_id"],
        utc(row["started_at"]),
        utc(row["ended_at"]),
        frozenset(row["gpu_uuids"]),
        row.get("correction_of"),
    )
