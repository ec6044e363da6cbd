"""Holds (issue 15) on a real RabbitMQ and PostgreSQL: an over-capacity
stream with double claims, rated by one metering process and by two
competing on the queue, holds exactly the records the rule holds when
decided at once (``domain.holds.held_set``), and the city hears of each held
record once: its ``usage_rated`` carries the hold, or a ``usage_hold``
follows it."""

import json
import random
from datetime import timedelta

import psycopg
import pytest
from kombu import Connection, Queue, binding

from services.common.amqp import FEDERATION_EXCHANGE
from services.common.contracts import UsageRecordSchema, canonical_json
from services.common.units import format_ts, utcnow
from services.metering.domain import holds
from services.metering.domain.rollups import hour_of
from services.metering.service import USAGE_QUEUE
from tests.integration.test_metering_faults import start_metering, wait_consumers
from tests.support import bus
from tests.support.metering_data import DATACENTER_ID, publish_usage, usage, voucher
from tests.support.polling import eventually
from tests.support.processes import stop

pytestmark = pytest.mark.integration

DEADLINE_S = 60
REGISTERED = {(DATACENTER_ID, "H800"): 256, (DATACENTER_ID, "Ascend-910B"): 512}
GPUS = [f"GPU-{n:02d}" for n in range(12)]


def stream(rng: random.Random, count: int) -> list[dict]:
    """``count`` records of DATACENTER_ID over four hours, most buckets over
    capacity, a third naming GPUs out of a small pool (so some overlap)."""
    base = hour_of(utcnow()) - timedelta(hours=10)
    codes = [voucher("SH"), voucher("CD")]
    records = []
    for n in range(count):
        start = base + timedelta(minutes=rng.randrange(240))
        minutes = rng.randrange(5, 120)
        gpus = rng.randrange(1, 9) if n % 3 == 0 else rng.randrange(1, 120)
        uuids = rng.sample(GPUS, gpus) if n % 3 == 0 else None
        records.append(
            usage(
                record_id=f"h-{n}",
                gpu_model="H800" if n % 4 else "Ascend-910B",
                voucher_code=codes[n % 2] if n % 5 else None,
                started_at=format_ts(start),
                ended_at=format_ts(start + timedelta(minutes=minutes)),
                gpu_count=gpus,
                gpu_seconds=gpus * minutes * 60 * rng.randrange(50, 101) // 100,
                gpu_uuids=uuids,
            )
        )
    return records


def stored(url: str) -> tuple[int, dict[str, dict]]:
    with psycopg.connect(url) as db:
        count = db.execute("SELECT count(*) FROM usage_records").fetchone()[0]
        rows = db.execute(
            "SELECT record_id, hold FROM usage_records WHERE hold IS NOT NULL"
        )
        return count, {rid: json.loads(hold) for rid, hold in rows}


def announced_holds(connection, queue: Queue) -> dict[str, list[dict]]:
    """Every hold the cities heard, by record id (from both events)."""
    found: dict[str, list[dict]] = {}
    with connection.SimpleQueue(queue) as simple:
        for message in bus.empty(simple):
            body = message.payload
            if body.get("hold") is not None:
                found.setdefault(body["record_id"], []).append(body["hold"])
    return found


@pytest.mark.parametrize("processes", [1, 2])
def test_an_over_capacity_stream_holds_exactly_the_rules_records(
    registry_stand_in, metering_db, processes
):
    rng = random.Random(15 + processes)
    records = stream(rng, 600)
    schema = UsageRecordSchema()
    expected = holds.held_set([schema.load(r) for r in records], REGISTERED)
    assert 50 < len(expected) < len(records)  # a stream with much to hold
    shuffled = records[:]
    rng.shuffle(shuffled)
    started = [
        start_metering(registry_stand_in, metering_db, BATCH_SIZE="40", CONSUMERS="2")
        for _ in range(processes)
    ]
    try:
        with Connection(registry_stand_in) as connection:
            cities = Queue(
                "test.holds",
                bindings=[
                    binding(FEDERATION_EXCHANGE, routing_key="*.usage_rated"),
                    binding(FEDERATION_EXCHANGE, routing_key="*.usage_hold"),
                ],
                auto_delete=True,
            )
            cities(connection.channel()).declare()
            wait_consumers(connection, 2 * processes)
            for record in shuffled + shuffled[:50]:  # and some delivered twice
                publish_usage(connection, canonical_json(record))
            assert eventually(
                lambda: stored(metering_db)[0] == len(records),
                DEADLINE_S,
                "every record stored",
            )
            bus.wait_acked(registry_stand_in, USAGE_QUEUE.name, len(shuffled) + 50)
            heard = announced_holds(connection, cities)
    finally:
        for process in started:
            stop(process)
    _count, held = stored(metering_db)
    assert set(held) == expected
    assert {hold["reason"] for hold in held.values()} == {
        "over_capacity",
        "double_claim",
    }
    with_city = {r["record_id"] for r in records if r["voucher_code"] is not None}
    assert set(heard) == expected & with_city
    # Each held record's hold was heard as stored (a redelivered duplicate may
    # repeat its usage_rated, with the same event id and hold).
    for record_id, seen in heard.items():
        assert all(hold == held[record_id] for hold in seen), record_id
