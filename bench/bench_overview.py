"""metering's usage overview over a long history: the all-time totals.

``usage_overview`` gives each data centre's all-time records, GPU-seconds and
cost beside its figures for a window. The all-time part used to be summed
over every hourly rollup ever written, a cost that grows with history;
metering now keeps it in ``usage_totals`` (one row per data centre and
stripe, moved by the transactions that move the rollups). This bench writes
a national history of rollups (``--datacenters`` × ``--days`` × 24 hours ×
``--tenants`` buckets) and the totals that ingest would have kept into a
fresh PostgreSQL database, then times, in the same run:

- ``totals_ms``: the all-time totals as metering reads them now;
- ``baseline_totals_ms``: the same figures summed over the rollups (the
  query it replaced), checked equal;
- ``overview_ms``: the whole ``usage_overview`` RPC body (24 h window).

    .venv/bin/python bench/bench_overview.py [--days 30] [--repeat 5]

Medians of ``--repeat`` timings; the last line is
``rollups=<n> totals_ms=<n> baseline_totals_ms=<n> overview_ms=<n>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import text
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.db import make_engine  # noqa: E402
from services.common.migrations import upgrade  # noqa: E402
from services.metering import reports  # noqa: E402

ADMIN_PG = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TOTALS = (
    "SELECT datacenter_id, sum(gpu_seconds), sum(records), sum(cost_fen)"
    " FROM {table} GROUP BY datacenter_id ORDER BY datacenter_id"
)


def seed(url: str, datacenters: int, days: int, tenants: int) -> int:
    """The rollups of ``days`` of history, and the totals ingest keeps."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO usage_rollups_hourly (datacenter_id, city, tenant_id,"
            " voucher_code, gpu_model, hour, records, gpu_seconds, cost_fen)"
            " SELECT 'dc-' || lpad(d::text, 4, '0'), 'city-' || (d %% 300),"
            " 'tenant-' || t, '', 'H800',"
            " date_trunc('hour', now()) - h * interval '1 hour',"
            " 1 + (d + h + t) %% 7, 3600 * (1 + (d + h + t) %% 7),"
            " 1800 * (1 + (d + h + t) %% 7)"
            " FROM generate_series(0, %s) d, generate_series(0, %s) h,"
            " generate_series(0, %s) t",
            (datacenters - 1, days * 24 - 1, tenants - 1),
        )
        # As ingest keeps them: several stripes a data centre.
        conn.execute(
            "INSERT INTO usage_totals (datacenter_id, stripe, records,"
            " gpu_seconds, cost_fen)"
            " SELECT datacenter_id, CAST(tenant_id = 'tenant-0' AS int), sum(records),"
            " sum(gpu_seconds), sum(cost_fen) FROM usage_rollups_hourly"
            " GROUP BY 1, 2"
        )
        conn.execute("ANALYZE")
        return conn.execute("SELECT count(*) FROM usage_rollups_hourly").fetchone()[0]


def timed(run, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datacenters", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--tenants", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    name = f"cn_bench_overview_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_PG, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{ADMIN_PG.rsplit('/', 1)[0]}/{name}"
    try:
        upgrade("metering", url)
        started = time.perf_counter()
        rollups = seed(url, args.datacenters, args.days, args.tenants)
        print(
            f"{rollups} rollups ({args.datacenters} data centres, {args.days} days,"
            f" {args.tenants} tenants) written in {time.perf_counter() - started:.0f} s"
        )
        engine = make_engine(url)
        try:
            with Session(engine) as session:

                def query(table: str):
                    return session.execute(text(TOTALS.format(table=table))).all()

                query("usage_totals"), query("usage_rollups_hourly")  # warm
                totals_ms, kept = timed(lambda: query("usage_totals"), args.repeat)
                baseline_ms, summed = timed(
                    lambda: query("usage_rollups_hourly"), args.repeat
                )
                assert kept == summed, "usage_totals differs from the rollups"
                overview_ms, _ = timed(
                    lambda: reports.usage_overview(session, 24), args.repeat
                )
        finally:
            engine.dispose()
    finally:
        with psycopg.connect(ADMIN_PG, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"all-time totals from usage_totals: {totals_ms:.1f} ms (median)")
    print(f"the same summed over the rollups (baseline): {baseline_ms:.1f} ms")
    print(f"usage_overview (24 h window, totals included): {overview_ms:.1f} ms")
    print(
        f"rollups={rollups} totals_ms={totals_ms:.1f}"
        f" baseline_totals_ms={baseline_ms:.1f} overview_ms={overview_ms:.1f}"
    )


if __name__ == "__main__":
    main()
