"""What metering prunes, and when a row is old enough (issue 16 item 6).

Kept for good: ``usage_records`` (a record is deduplicated by its id forever,
DESIGN.md §4), the rollups and totals (the overview's figures), the data
centres seen. Pruned, each by its class of ``services.common.retention``:

- ``dead_letters`` by ``received_at`` (class ``dead_letters``);
- ``capacity_reports`` by ``reported_at`` (``capacity_reports``: kept for the
  longest window the overview reads them for; they have no rollup);
- ``capacity_buckets`` and ``capacity_claims`` by their ``hour``,
  ``gpu_claims`` by their ``ended_at`` (``capacity_holds``);
- ``delivery_attempts`` by ``updated_at`` (``delivery_attempts``).
"""

from __future__ import annotations

from services.common.retention import Target
from services.common.retention_entrypoints import retention_entrypoints
from services.metering.models import (
    CapacityBucket,
    CapacityClaim,
    CapacityReport,
    DeadLetter,
    DeliveryAttempt,
    GpuClaim,
)


def targets() -> list[Target]:
    dead, reports = DeadLetter.__table__, CapacityReport.__table__
    buckets, claims = CapacityBucket.__table__, CapacityClaim.__table__
    gpus, attempts = GpuClaim.__table__, DeliveryAttempt.__table__
    return [
        Target(dead, "dead_letters", lambda cutoff: dead.c.received_at < cutoff),
        Target(
            reports, "capacity_reports", lambda cutoff: reports.c.reported_at < cutoff
        ),
        # A bucket's hour starts the hour: the whole hour is older than cutoff
        # once hour + 1 h <= cutoff; the floor is days, so "hour < cutoff" is
        # within an hour of that, on the side of keeping.
        Target(buckets, "capacity_holds", lambda cutoff: buckets.c.hour < cutoff),
        Target(claims, "capacity_holds", lambda cutoff: claims.c.hour < cutoff),
        Target(gpus, "capacity_holds", lambda cutoff: gpus.c.ended_at < cutoff),
        Target(
            attempts, "delivery_attempts", lambda cutoff: attempts.c.updated_at < cutoff
        ),
    ]


MeteringRetention = retention_entrypoints(targets)
