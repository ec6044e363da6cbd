"""The holds' cost per record (issue 15) at 1 000 data centres, on PostgreSQL.

    .venv/bin/python bench/bench_holds.py [--records 40000] [--datacenters 1000]

Runs ``ingest.process_batch`` in this process (no broker: the cost of the
checks alone, not drowned by RabbitMQ's) on batches of 500 records spread
over ``--datacenters`` data centres (each its two GPU models, its records
in time order over the last days, an honest load: nothing over capacity),
with the checks on, and on the same batches in a fresh database with
``holds.decide`` replaced by a no-op: the same-run baseline. The two
alternate ``--runs`` times (default 3) so that the machine's swings fall on
both. Then a dishonest data centre: every bucket over capacity (the checks'
slow path, which reads the bucket's claims).

Prints per record: µs with the checks, µs without, their difference; the
last line ``holds_us_per_record=<median difference> …``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
from sqlalchemy.orm import sessionmaker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.db import make_engine  # noqa: E402
from services.common.migrations import upgrade  # noqa: E402
from services.common.units import format_ts, utcnow  # noqa: E402
from services.metering import holds, ingest  # noqa: E402
from services.metering.registry import CachedRegistry, RegistryCacheState  # noqa: E402
from tests.support.metering_data import (  # noqa: E402
    DATACENTER,
    KEY_ID,
    PREFIXES,
    SECRET,
    raw_message,
    usage,
    voucher,
)

PG_ADMIN = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BATCH = 500


class ManyDatacenters:
    """The registry of ``count`` data centres alike (``dc-0000`` …)."""

    def __init__(self, count: int, h800: int = 256) -> None:
        self.ids = [f"dc-{n:04d}" for n in range(count)]
        inventory = [dict(item) for item in DATACENTER["inventory"]]
        inventory[0]["count"] = h800
        self.inventory = inventory

    def get_datacenter(self, datacenter_id: str) -> dict:
        return {**DATACENTER, "id": datacenter_id, "inventory": self.inventory}

    def datacenter_signing_keys(self, datacenter_id: str) -> list[dict[str, str]]:
        return [{"key_id": KEY_ID, "secret": SECRET}]

    def voucher_prefixes(self) -> dict[str, str]:
        return PREFIXES


def batches(count: int, datacenters: list[str], per_hour: int) -> list[list]:
    """Records round-robin over ``datacenters``, each data centre's in time
    order, ``per_hour`` of them starting in each of its hours."""
    codes = [voucher("SH") for _ in range(20)]
    end = utcnow().replace(microsecond=0) - timedelta(minutes=1)
    per_dc = count // len(datacenters) + 1
    hours = per_dc // per_hour + 1
    messages = []
    for n in range(count):
        dc = datacenters[n % len(datacenters)]
        k = n // len(datacenters)
        started = end - timedelta(hours=hours - k // per_hour)
        record = usage(
            record_id=f"b-{n}",
            datacenter_id=dc,
            tenant_id=f"tenant-{n % 50}",
            voucher_code=codes[n % len(codes)],
            gpu_model="H800" if n % 3 else "Ascend-910B",
            gpu_seconds=3600 + n % 3600,
            started_at=format_ts(started),
            ended_at=format_ts(started + timedelta(hours=1)),
        )
        messages.append(raw_message(record, routing_key=f"{dc}.usage"))
    return [messages[n : n + BATCH] for n in range(0, len(messages), BATCH)]


def timed(registry, work: list[list], checks: bool) -> tuple[float, int]:
    """Seconds to process ``work`` in a fresh database; and the holds made."""
    name = f"cn_bench_holds_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    decide = holds.decide
    try:
        upgrade("metering", url)
        engine = make_engine(url)
        if not checks:
            holds.decide = lambda *args, **kwargs: {}
        held = 0
        with sessionmaker(engine, expire_on_commit=False)() as session:
            ingest.process_batch(session, registry, work[0])  # warm: connection
            began = time.perf_counter()
            for batch in work[1:]:
                outcome = ingest.process_batch(session, registry, batch)
                held += sum(
                    1
                    for out in outcome.outgoing
                    if b'"hold":' in out.body or "usage_hold" in out.routing_key
                )
            elapsed = time.perf_counter() - began
        engine.dispose()
        return elapsed, held
    finally:
        holds.decide = decide
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(label: str, registry, work, runs: int) -> float:
    records = sum(len(batch) for batch in work[1:])
    differences = []
    for run in range(runs):
        on, held = timed(registry, work, True)
        off, _ = timed(registry, work, False)
        on_us, off_us = on / records * 1e6, off / records * 1e6
        differences.append(on_us - off_us)
        print(
            f"{label} run {run + 1}: {on_us:.1f} µs/record with the checks, "
            f"{off_us:.1f} without (same run), +{on_us - off_us:.1f} µs; "
            f"{held} held",
            flush=True,
        )
    return statistics.median(differences)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--datacenters", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    fake = ManyDatacenters(args.datacenters)
    registry = CachedRegistry(RegistryCacheState(ttl_s=3600), fake)
    honest = measure(
        f"{args.datacenters} data centres",
        registry,
        batches(args.records, fake.ids, per_hour=100),
        args.runs,
    )
    # One data centre of 8 H800s sending 20 two-GPU hours an hour: every
    # bucket over, each batch reads its buckets' claims.
    small = ManyDatacenters(1, h800=8)
    dishonest = measure(
        "1 over-capacity data centre",
        CachedRegistry(RegistryCacheState(ttl_s=3600), small),
        batches(min(args.records, 10_000), small.ids, per_hour=20),
        args.runs,
    )
    print(
        f"holds_us_per_record={honest:.1f} "
        f"over_capacity_us_per_record={dishonest:.1f} "
        f"datacenters={args.datacenters}"
    )


if __name__ == "__main__":
    main()
