"""Capacity in the window, summed by PostgreSQL, equals the walk in Python.

metering's overview sums each data centre's capacity slices in SQL on
PostgreSQL (a report a data centre every 5 minutes is 288 000 rows a day
nationally) and walks them in Python on SQLite (``rollups.capacity_gpu_seconds``,
which the unit tests pin down). Random report series — gaps shorter and
longer than a slice, reports before the window, data centres whose reports
begin inside it, odd microseconds — must give the same figures both ways.
"""

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from services.common.db import make_engine
from services.common.migrations import upgrade
from services.metering import reports
from services.metering.models import CapacityReport

pytestmark = pytest.mark.integration


def _series(rng: random.Random, dc: str, start: datetime, now: datetime):
    inside = int((now - start).total_seconds()) // 2
    at = start - timedelta(seconds=rng.randint(-inside, 900))  # some begin inside
    while at <= now + timedelta(seconds=60):
        yield CapacityReport(
            datacenter_id=dc,
            reported_at=at,
            received_at=at,
            report_sha256="0" * 64,
            total_gpus=rng.randint(0, 4096),
            allocated_gpus=0,
            gpus=[],
        )
        at += timedelta(
            seconds=rng.choice([rng.randint(1, 299), 300, rng.randint(301, 1800)]),
            microseconds=rng.randint(0, 999_999),
        )


@pytest.mark.parametrize("window_hours", [1, 24])
def test_postgresql_sums_the_slices_as_python_walks_them(pg_url, window_hours):
    upgrade("metering", pg_url)
    engine = make_engine(pg_url)
    rng = random.Random(window_hours)
    try:
        with Session(engine) as session:
            for scenario in range(12):
                now = datetime(2026, 11, 22, 10, tzinfo=UTC) + timedelta(
                    seconds=rng.randint(0, 86_400),
                    microseconds=rng.randint(0, 10**6 - 1),
                )
                start = now - timedelta(hours=window_hours)
                for n in range(rng.randint(1, 6)):
                    session.add_all(_series(rng, f"dc-{scenario}-{n}", start, now))
                session.flush()
                summed = reports._capacity_summed(session, start, now)
                walked = reports._capacity_walked(session, start, now)
                assert summed == walked, scenario
                assert summed and all(seconds >= 0 for seconds, *_ in summed.values())
                session.execute(delete(CapacityReport))
    finally:
        engine.dispose()


def test_the_overview_on_postgresql_uses_the_sum(pg_url):
    """The dispatch itself: PostgreSQL sums, and the overview agrees."""
    upgrade("metering", pg_url)
    engine = make_engine(pg_url)
    now = datetime(2026, 11, 22, 12, 0, 30, tzinfo=UTC)
    try:
        with Session(engine) as session:
            session.add_all(
                CapacityReport(
                    datacenter_id="guian-gov-01",
                    reported_at=now - timedelta(minutes=5 * k),
                    received_at=now,
                    report_sha256="0" * 64,
                    total_gpus=100,
                    allocated_gpus=0,
                    gpus=[],
                )
                for k in range(24 * 12 + 2)
            )
            session.flush()
            overview = reports.usage_overview(session, 24, now=now)
            row = overview["datacenters"]["guian-gov-01"]
            assert row["capacity_gpu_seconds_window"] == 100 * 24 * 3600
            assert row["utilisation_window"] == 0.0
    finally:
        engine.dispose()
