"""Pruning an old backlog in batches, against one DELETE, on PostgreSQL.

    .venv/bin/python bench/bench_retention.py [--rows 200000] [--batch 1000]

Fills the registry's ``processed_events`` (its real schema, migrated into a
fresh database) with ``--rows`` events older than the retention and 10 000
young ones, then deletes the old ones two ways, each in a fresh database of
the same fill, alternating ``--runs`` times (default 2) so that the
machine's swings fall on both:

- **batched**: ``services.common.retention.prune`` (``--batch`` rows a
  transaction, ``--pause`` ms between);
- **baseline**: one ``DELETE … WHERE processed_at < cutoff``, one transaction.

Meanwhile a writer plays a consumer receiving redeliveries: it claims
random *old* event ids (``INSERT … ON CONFLICT DO NOTHING``, its own short
transaction each), the one write that must wait for a delete holding that
row. Its longest commit is what a consumer suffers from the pruner.

Prints per run and way: rows/s, the longest transaction (the lock), the
writer's longest wait and its commits during the delete; the last line
``retention_rows_per_s=<median> longest_batch_ms=… baseline_lock_ms=…
writer_max_wait_ms=… baseline_writer_max_wait_ms=… …``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.city_registry.models import ProcessedEvent  # noqa: E402
from services.common.db import make_engine  # noqa: E402
from services.common.migrations import upgrade  # noqa: E402
from services.common.retention import DAY, policy_from_config, prune  # noqa: E402
from services.common.units import utcnow  # noqa: E402

PG_ADMIN = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
YOUNG = 10_000
TABLE = ProcessedEvent.__table__


def fresh_database(rows: int) -> tuple[str, str]:
    """(name, url) of a new database with ``rows`` old and YOUNG young events."""
    name = f"cn_bench_retention_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    upgrade("city_registry", url)
    engine = make_engine(url)
    days = policy_from_config({}).days["processed_events"]
    fill = text(
        "INSERT INTO processed_events (city_code, event_id, event, processed_at) "
        "SELECT 'shanghai', :prefix || n, 'voucher_redeemed', "
        ":at - n * interval '1 second' FROM generate_series(1, :count) AS n"
    )
    with engine.begin() as connection:
        connection.execute(
            fill, {"prefix": "old-", "at": utcnow() - (days + 30) * DAY, "count": rows}
        )
        connection.execute(fill, {"prefix": "young-", "at": utcnow(), "count": YOUNG})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE processed_events"))
    engine.dispose()
    return name, url


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Writer(threading.Thread):
    """Claims random old event ids, one short transaction each, and times them."""

    def __init__(self, url: str, rows: int):
        super().__init__(daemon=True)
        self.url, self.rows = url, rows
        self.stop = threading.Event()
        self.measuring = threading.Event()
        self.waits: list[float] = []

    def run(self) -> None:
        claim = text(
            "INSERT INTO processed_events (city_code, event_id, event, processed_at) "
            "VALUES ('shanghai', :id, 'voucher_redeemed', now()) "
            "ON CONFLICT DO NOTHING"
        )
        with psycopg.connect(self.url) as connection:
            while not self.stop.is_set():
                event = f"old-{random.randint(1, self.rows)}"
                measured = self.measuring.is_set()
                began = time.perf_counter()
                connection.execute(claim.text.replace(":id", "%s"), (event,))
                connection.commit()
                # Decided before the claim: the one that waited for the
                # delete ends after it, when measuring is already over.
                if measured or self.measuring.is_set():
                    self.waits.append(time.perf_counter() - began)
                time.sleep(0.002)


def run_once(rows: int, batched: bool, batch: int, pause_s: float) -> dict:
    name, url = fresh_database(rows)
    try:
        engine = make_engine(url)
        cutoff = utcnow() - policy_from_config({}).days["processed_events"] * DAY
        writer = Writer(url, rows)
        writer.start()
        time.sleep(0.3)
        writer.measuring.set()
        began = time.perf_counter()
        if batched:
            pruned = prune(
                engine,
                TABLE,
                TABLE.c.processed_at < cutoff,
                batch_size=batch,
                pause_s=pause_s,
            )
            deleted, lock_s = pruned.rows, pruned.longest_batch_s
        else:
            with engine.begin() as connection:
                deleted = connection.execute(
                    TABLE.delete().where(TABLE.c.processed_at < cutoff)
                ).rowcount
            lock_s = time.perf_counter() - began
        elapsed = time.perf_counter() - began
        writer.measuring.clear()
        writer.stop.set()
        writer.join(10)
        engine.dispose()
        return {
            "rows": deleted,
            "seconds": elapsed,
            "rows_per_s": deleted / elapsed,
            "lock_ms": lock_s * 1000,
            "writer_max_ms": max(writer.waits, default=0.0) * 1000,
            "writer_commits": len(writer.waits),
        }
    finally:
        drop_database(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--pause", type=float, default=50.0, help="ms between")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    results: dict[bool, list[dict]] = {True: [], False: []}
    for run in range(args.runs):
        order = (True, False) if run % 2 == 0 else (False, True)
        for batched in order:
            result = run_once(args.rows, batched, args.batch, args.pause / 1000)
            results[batched].append(result)
            print(
                f"run {run + 1} {'batched ' if batched else 'baseline'}: "
                f"{result['rows']} rows in {result['seconds']:.2f} s, "
                f"{result['rows_per_s']:.0f} rows/s; longest transaction "
                f"{result['lock_ms']:.1f} ms; writer's longest wait "
                f"{result['writer_max_ms']:.1f} ms, "
                f"{result['writer_commits']} commits meanwhile",
                flush=True,
            )

    def median(batched: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[batched])

    print(
        f"retention_rows_per_s={median(True, 'rows_per_s'):.0f} "
        f"longest_batch_ms={median(True, 'lock_ms'):.1f} "
        f"writer_max_wait_ms={median(True, 'writer_max_ms'):.1f} "
        f"baseline_rows_per_s={median(False, 'rows_per_s'):.0f} "
        f"baseline_lock_ms={median(False, 'lock_ms'):.1f} "
        f"baseline_writer_max_wait_ms={median(False, 'writer_max_ms'):.1f} "
        f"rows={args.rows} batch={args.batch} pause_ms={args.pause:g}"
    )


if __name__ == "__main__":
    main()
