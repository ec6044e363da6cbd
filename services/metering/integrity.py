"""What metering knows of each data centre's honesty (issue 15, the
integrity page): over the last 24 h and 7 days, how many records it rated and
how many it set aside as dead letters, by reason.

A record counts once, in the hour it started (the rollups' ``records``); a
dead letter in the window of its arrival. The cities' refusals and holds are
the registry's to count (``city_refusal_counts``); the portal puts the two
side by side (``gateway/integrity.py``). Two grouped queries per window over
indexed columns: the page costs as much at 1 000 data centres as the
overview does.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.common.units import utcnow
from services.metering.models import DeadLetter, UsageRollup
from services.metering.reports import FIGURE_WINDOWS


def integrity_counts(session: Session, now: datetime | None = None) -> dict[str, Any]:
    """``{dc: {"24h": {"records", "dead_letters": {reason: n}}, "7d": …}}``."""
    now = now or utcnow()
    counts: dict[str, dict[str, Any]] = {}

    def window(dc: str, label: str) -> dict[str, Any]:
        by_window = counts.setdefault(dc, {})
        return by_window.setdefault(label, {"records": 0, "dead_letters": {}})

    for label, hours in FIGURE_WINDOWS.items():
        since = now - timedelta(hours=hours)
        # The hour a record started in counts whole when it starts in the window.
        hour_since = since.replace(minute=0, second=0, microsecond=0)
        for dc, records in session.execute(
            select(UsageRollup.datacenter_id, func.sum(UsageRollup.records))
            .where(UsageRollup.hour >= hour_since, UsageRollup.hour <= now)
            .group_by(UsageRollup.datacenter_id)
        ):
            window(dc, label)["records"] = int(records or 0)
        for dc, reason, letters in session.execute(
            select(DeadLetter.datacenter_id, DeadLetter.reason, func.count())
            .where(DeadLetter.received_at >= since)
            .group_by(DeadLetter.datacenter_id, DeadLetter.reason)
        ):
            window(dc, label)["dead_letters"][reason] = int(letters)
    for by_window in counts.values():
        for label in FIGURE_WINDOWS:
            by_window.setdefault(label, {"records": 0, "dead_letters": {}})
    session.rollback()
    return counts
