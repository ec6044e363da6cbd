"""Retention on PostgreSQL (issue 16 item 6): each service's tables pruned by
the default policy, what is still needed kept, and writers never held up for
long by the pruner."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select, text

from services.city_registry import retention as registry_retention
from services.city_registry.models import ParkedEvent, ProcessedEvent
from services.common.db import make_engine
from services.common.migrations import upgrade
from services.common.retention import policy_from_config, prune, prune_targets
from services.common.units import utcnow
from services.datacenter_gateway import retention as gateway_retention
from services.datacenter_gateway.outbox import OutboxRecord
from services.metering import retention as metering_retention
from services.metering.models import (
    CapacityBucket,
    CapacityClaim,
    CapacityReport,
    DeadLetter,
    DeliveryAttempt,
    GpuClaim,
)
from services.vouchers import retention as vouchers_retention
from services.vouchers.models import OutboxEvent

NOW = utcnow().replace(minute=0, second=0, microsecond=0)
POLICY = policy_from_config({})
DAYS = POLICY.days


def ago(days: float):
    return NOW - timedelta(days=days)


@pytest.fixture
def engine_of():
    engines = []

    def make(url):
        engine = make_engine(url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def _rows(engine, table, column):
    with engine.connect() as connection:
        return sorted(connection.execute(select(column)).scalars())


def test_metering_keeps_what_holds_and_the_overview_still_read(metering_db, engine_of):
    engine = engine_of(metering_db)
    dead_old, dead_young = ago(DAYS["dead_letters"] + 1), ago(DAYS["dead_letters"] - 1)
    report_old = ago(DAYS["capacity_reports"] + 1)
    report_young = ago(DAYS["capacity_reports"] - 1)
    hour_old = ago(DAYS["capacity_holds"] + 1)
    hour_young = ago(DAYS["capacity_holds"] - 1)
    with engine.begin() as connection:
        connection.execute(
            insert(DeadLetter),
            [
                {
                    "received_at": at,
                    "routing_key": "dc-1.usage",
                    "datacenter_id": "dc-1",
                    "reason": "schema",
                    "detail": name,
                    "headers": {},
                    "body": "{}",
                }
                for name, at in (("old", dead_old), ("young", dead_young))
            ],
        )
        connection.execute(
            insert(CapacityReport),
            [
                {
                    "datacenter_id": "dc-1",
                    "reported_at": at,
                    "received_at": at,
                    "report_sha256": "0" * 64,
                    "total_gpus": 8,
                    "allocated_gpus": 2,
                    "gpus": [],
                }
                for at in (report_old, report_young)
            ],
        )
        for table in (CapacityBucket, CapacityClaim):
            extra = {} if table is CapacityBucket else {"record_id": "r"}
            connection.execute(
                insert(table),
                [
                    {
                        "datacenter_id": "dc-1",
                        "gpu_model": "H800",
                        "hour": hour,
                        "gpu_seconds": 3600,
                        **({"started_at": hour} if extra else {}),
                        **extra,
                    }
                    for hour in (hour_old, hour_young)
                ],
            )
        connection.execute(
            insert(GpuClaim),
            [
                {
                    "datacenter_id": "dc-1",
                    "gpu_uuid": f"GPU-{n}",
                    "started_at": end - timedelta(hours=1),
                    "record_id": f"r{n}",
                    "ended_at": end,
                }
                for n, end in enumerate((hour_old, hour_young))
            ],
        )
        connection.execute(
            insert(DeliveryAttempt),
            [
                {
                    "message_key": key,
                    "attempts": 1,
                    "last_error": "x",
                    "updated_at": ago(DAYS["delivery_attempts"] + days),
                }
                for key, days in (("old", 1), ("young", -1))
            ],
        )

    pruned = prune_targets(engine, metering_retention.targets(), POLICY, now=NOW)

    assert {p.table: p.rows for p in pruned} == {
        "dead_letters": 1,
        "capacity_reports": 1,
        "capacity_buckets": 1,
        "capacity_claims": 1,
        "gpu_claims": 1,
        "delivery_attempts": 1,
    }
    assert _rows(engine, DeadLetter, DeadLetter.detail) == ["young"]
    assert _rows(engine, CapacityReport, CapacityReport.reported_at) == [report_young]
    assert _rows(engine, CapacityBucket, CapacityBucket.hour) == [hour_young]
    assert _rows(engine, CapacityClaim, CapacityClaim.hour) == [hour_young]
    assert _rows(engine, GpuClaim, GpuClaim.ended_at) == [hour_young]
    assert _rows(engine, DeliveryAttempt, DeliveryAttempt.message_key) == ["young"]


def test_vouchers_prune_only_published_outbox_rows(vouchers_db, engine_of):
    engine = engine_of(vouchers_db)
    old, young = ago(DAYS["outbox"] + 1), ago(DAYS["outbox"] - 1)
    with engine.begin() as connection:
        connection.execute(
            insert(OutboxEvent),
            [
                {
                    "event_id": name,
                    "event": "voucher_redeemed",
                    "body": {},
                    "created_at": created,
                    "published_at": published,
                }
                for name, created, published in (
                    ("published long ago", old, old),
                    ("never published", ago(999), None),
                    ("published lately", old, young),
                )
            ],
        )

    [pruned] = prune_targets(engine, vouchers_retention.targets(), POLICY, now=NOW)

    assert pruned.rows == 1
    assert _rows(engine, OutboxEvent, OutboxEvent.event_id) == [
        "never published",
        "published lately",
    ]


def test_registry_keeps_processed_events_within_the_redelivery_horizon(
    pg_url_factory, engine_of
):
    url = pg_url_factory("registry")
    upgrade("city_registry", url)
    engine = engine_of(url)
    kept = DAYS["processed_events"]
    with engine.begin() as connection:
        connection.execute(
            insert(ProcessedEvent),
            [
                {
                    "city_code": "shanghai",
                    "event_id": name,
                    "event": "voucher_redeemed",
                    "processed_at": ago(days),
                }
                for name, days in (("old", kept + 1), ("young", kept - 1))
            ],
        )
        connection.execute(
            insert(ParkedEvent),
            [
                {
                    "routing_key": "shanghai.voucher_redeemed",
                    "body": "{}",
                    "kind": "rejected",
                    "reason": name,
                    "attempts": 1,
                    "parked_at": ago(days),
                }
                for name, days in (
                    ("old", DAYS["dead_letters"] + 1),
                    ("young", DAYS["dead_letters"] - 1),
                )
            ],
        )

    pruned = prune_targets(engine, registry_retention.targets(), POLICY, now=NOW)

    assert [p.rows for p in pruned] == [1, 1]
    assert _rows(engine, ProcessedEvent, ProcessedEvent.event_id) == ["young"]
    assert _rows(engine, ParkedEvent, ParkedEvent.reason) == ["young"]


def test_gateway_keeps_unpublished_and_running_records(pg_url_factory, engine_of):
    url = pg_url_factory("dcgw")
    upgrade("datacenter_gateway", url)
    engine = engine_of(url)
    old, young = ago(DAYS["outbox"] + 1), ago(DAYS["outbox"] - 1)
    with engine.begin() as connection:
        connection.execute(
            insert(OutboxRecord),
            [
                {
                    "record_id": name,
                    "body": b"{}",
                    "agent_digest": "0" * 64,
                    "tenant_id": "t",
                    "gpu_model": "H800",
                    "gpu_count": 1,
                    "started_at": old - timedelta(hours=1),
                    "ended_at": ended,
                    "created_at": old,
                    "published_at": published,
                }
                for name, ended, published in (
                    ("published, ended long ago", old, old),
                    ("never published", old, None),
                    ("published, still running", NOW + timedelta(days=1), old),
                    ("published lately", old, young),
                )
            ],
        )

    [pruned] = prune_targets(engine, gateway_retention.targets(), POLICY, now=NOW)

    assert pruned.rows == 1
    assert _rows(engine, OutboxRecord, OutboxRecord.record_id) == [
        "never published",
        "published lately",
        "published, still running",
    ]


# -- writers and the pruner ---------------------------------------------------


def _fill_processed(engine, count: int, days_ago: float) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO processed_events (city_code, event_id, event, "
                "processed_at) SELECT 'shanghai', 'old-' || n, 'voucher_redeemed', "
                ":at FROM generate_series(1, :count) AS n"
            ),
            {"at": ago(days_ago), "count": count},
        )


def test_a_writer_keeps_committing_while_the_pruner_runs(pg_url_factory, engine_of):
    """A consumer claiming events (inserting processed_events) during a prune
    of 60 000 old ones commits all along, each commit quick."""
    url = pg_url_factory("registry")
    upgrade("city_registry", url)
    engine = engine_of(url)
    _fill_processed(engine, 60_000, DAYS["processed_events"] + 10)
    table = ProcessedEvent.__table__
    stop = threading.Event()
    latencies: list[float] = []
    during: list[int] = []
    pruning = threading.Event()

    def writer():
        writer_engine = make_engine(url)
        try:
            while not stop.is_set():
                began = time.perf_counter()
                with writer_engine.begin() as connection:
                    connection.execute(
                        insert(table),
                        {
                            "city_code": "shanghai",
                            "event_id": uuid.uuid4().hex,
                            "event": "voucher_redeemed",
                            "processed_at": utcnow(),
                        },
                    )
                latencies.append(time.perf_counter() - began)
                if pruning.is_set():
                    during.append(1)
        finally:
            writer_engine.dispose()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        pruning.set()
        pruned = prune(
            engine,
            table,
            table.c.processed_at < POLICY.cutoff("processed_events"),
            batch_size=1000,
            pause_s=0.01,
        )
        pruning.clear()
    finally:
        stop.set()
        thread.join(10)
    assert pruned.rows == 60_000
    assert pruned.longest_batch_s < 1.0
    assert len(during) > 20  # it went on committing during the prune
    assert max(latencies) < 1.0
    with engine.connect() as connection:
        left = connection.scalar(select(func.count()).select_from(table))
    assert left == len(latencies)  # every event it claimed is kept


def test_the_pruner_skips_a_row_a_writer_holds(pg_url_factory, engine_of):
    """A transaction holding an old row (a replay of a parked event, say)
    does not make the pruner wait: that row is skipped this round."""
    url = pg_url_factory("registry")
    upgrade("city_registry", url)
    engine = engine_of(url)
    _fill_processed(engine, 3000, DAYS["processed_events"] + 10)
    table = ProcessedEvent.__table__
    holder = engine_of(url).connect()
    try:
        transaction = holder.begin()
        holder.execute(
            text("SELECT 1 FROM processed_events WHERE event_id = 'old-7' FOR UPDATE")
        )
        began = time.perf_counter()
        pruned = prune(
            engine,
            table,
            table.c.processed_at < POLICY.cutoff("processed_events"),
            batch_size=500,
            pause_s=0,
        )
        elapsed = time.perf_counter() - began
        transaction.rollback()
    finally:
        holder.close()
    assert pruned.rows == 2999
    assert elapsed < 5.0
    assert _rows(engine, table, table.c.event_id) == ["old-7"]
