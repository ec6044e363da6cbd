"""metering under faults, against a real RabbitMQ and PostgreSQL.

- a corpus of bad messages: each is a dead letter with the right reason, no
  total moves, the consumer keeps going;
- records in random order with corrections interleaved, rated by two metering
  processes competing on one queue: the rollups equal the in-order result;
- rival corrections of the same records, rated by two processes at once: one
  of each pair stored, the other ``already_corrected``, nothing counted twice;
- metering killed with SIGKILL mid-stream with 50 000 records in flight, then
  restarted: every record stored and rolled up exactly once.
"""

import os
import random
import signal
import subprocess
from collections import Counter
from datetime import timedelta

import nameko
import psycopg
import pytest
from kombu import Connection
from nameko.standalone.rpc import ServiceRpcClient
from sqlalchemy.orm import sessionmaker

from services.common import batching, signing
from services.common.amqp import USAGE_EXCHANGE
from services.common.config import DATABASE_URL, REGISTRY_CACHE_TTL_S
from services.common.contracts import canonical_json
from services.common.db import make_engine
from services.common.migrations import upgrade
from services.common.rpc_access import caller_options
from services.common.units import format_ts, utcnow
from services.metering import ingest, store
from services.metering.registry import CachedRegistry, RegistryCacheState
from services.metering.service import USAGE_QUEUE, MeteringService
from tests.support import bus
from tests.support.metering_data import (
    DATACENTER_ID,
    KEY_ID,
    SECRET,
    FakeRegistry,
    capacity,
    dead_letters,
    parked_events,
    publish_usage,
    raw_message,
    signed_headers,
    usage,
    voucher,
)
from tests.support.polling import eventually
from tests.support.processes import start_service, stop

pytestmark = pytest.mark.integration

DEADLINE_S = 60


def totals(url: str) -> tuple[int, int, int, int]:
    with psycopg.connect(url) as db:
        # one snapshot for every figure, while metering may be committing
        db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        records = db.execute("SELECT count(*) FROM usage_records").fetchone()[0]
        rolled = db.execute(
            "SELECT coalesce(sum(records), 0), coalesce(sum(gpu_seconds), 0),"
            " coalesce(sum(cost_fen), 0) FROM usage_rollups_hourly"
        ).fetchone()
        # the all-time totals metering keeps beside the rollups (on stripes)
        kept = db.execute(
            "SELECT coalesce(sum(records), 0), coalesce(sum(gpu_seconds), 0),"
            " coalesce(sum(cost_fen), 0) FROM usage_totals"
        ).fetchone()
    assert kept == rolled, (kept, rolled)
    return (records, *(int(value) for value in rolled))


def rollups(url: str) -> dict:
    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT datacenter_id, city, tenant_id, voucher_code, gpu_model, hour,"
            " records, gpu_seconds, cost_fen FROM usage_rollups_hourly"
        ).fetchall()
    return {
        (dc, city, tenant, code, model, hour.replace(tzinfo=None)): values
        for dc, city, tenant, code, model, hour, *values in rows
        if any(values)  # a bucket emptied by a correction is the same as none
    }


def _bad_corpus():
    """(description, body, routing key, headers or None, properties, reason)."""
    ago = utcnow().replace(microsecond=0)
    other_key = {"key_id": "lingang-com-01-k1", "secret": "lingang-secret"}
    corpus = []

    def bad(name, reason, record=None, body=None, routing_key=None, **extra):
        body = canonical_json(record) if body is None else body
        corpus.append((name, body, routing_key, extra.get("headers"), extra, reason))

    for field, value in [
        ("gpu_count", 0),
        ("gpu_count", "2"),
        ("gpu_seconds", -1),
        ("gpu_seconds", 2.5),
        ("record_id", ""),
        ("record_id", "r" * 129),
        ("tenant_id", ""),
        ("source", ""),
        ("started_at", "2025-01-01T00:00:00"),  # no timezone
        ("ended_at", "yesterday"),
        ("voucher_code", 42),
        ("tenant_id", "nul\x00byte"),
    ]:
        bad(f"{field}={value!r}", "schema", usage(**{field: value}))
    bad(
        "missing tenant",
        "schema",
        {k: v for k, v in usage().items() if k != "tenant_id"},
    )
    bad("unknown field", "schema", usage(colour="blue"))
    bad(
        "ends before it starts",
        "schema",
        usage(
            started_at=format_ts(ago - timedelta(minutes=5)),
            ended_at=format_ts(ago - timedelta(minutes=10)),
        ),
    )
    bad(
        "span over 31 days",
        "schema",
        usage(started_at=format_ts(ago - timedelta(days=32)), ended_at=format_ts(ago)),
    )
    bad(
        "ends in the future",
        "schema",
        usage(
            started_at=format_ts(ago), ended_at=format_ts(ago + timedelta(minutes=30))
        ),
    )
    bad("more seconds than the span", "schema", usage(gpu_count=1, gpu_seconds=3601))
    bad("corrects itself", "schema", usage(record_id="self-1", correction_of="self-1"))
    bad("not JSON", "schema", body=b"{not json")
    bad("a JSON array", "schema", body=b"[1, 2]")
    bad("not UTF-8", "schema", body=b"\xff\xfe{}")
    bad("wrong content type", "schema", usage(), content_type="text/plain")
    bad("oversized", "schema", body=b'{"pad": "' + b"x" * 70_000 + b'"}')
    bad(
        "capacity report allocating more than it has",
        "schema",
        capacity(ago, total=4, allocated=5),
        routing_key=f"{DATACENTER_ID}.capacity",
    )
    bad(
        "forged signature",
        "bad_signature",
        usage(),
        headers={"x-key-id": KEY_ID, "x-signature": "0" * 64},
    )
    bad(
        "no key id",
        "bad_signature",
        usage(),
        headers={"x-signature": signing.sign(b"", SECRET)},
    )
    bad(
        "unknown key id",
        "bad_signature",
        usage(),
        headers={"x-key-id": "guian-gov-01-old", "x-signature": "ab"},
    )
    record = usage()
    bad(
        "another data centre's key",
        "bad_signature",
        record,
        headers=signed_headers(canonical_json(record), **other_key),
    )
    tampered = usage()
    bad(
        "body changed after signing",
        "bad_signature",
        dict(tampered, gpu_seconds=1),
        headers=signed_headers(canonical_json(tampered)),
    )
    bad(
        "unregistered data centre",
        "unknown_datacenter",
        usage(datacenter_id="nowhere-01"),
        routing_key="nowhere-01.usage",
    )
    bad(
        "routing key of another data centre",
        "datacenter_mismatch",
        usage(datacenter_id="lingang-com-01"),
    )
    bad("GPU model not in the inventory", "unknown_gpu_model", usage(gpu_model="B200"))
    bad(
        "more GPUs than registered",
        "exceeds_inventory",
        usage(gpu_count=257, gpu_seconds=257),
    )
    bad("mistyped voucher", "unknown_voucher", usage(voucher_code="SH-7K3F9QXD2M4A-Z"))
    bad("voucher of no city", "unknown_voucher", usage(voucher_code=voucher("ZZ")))
    return corpus


def test_bad_corpus_ends_in_dead_letters_and_moves_no_total(metering, metering_db):
    good = [usage(voucher_code=voucher("SH")) for _ in range(3)]
    corpus = _bad_corpus()
    with Connection(metering) as connection:
        for record in good:
            publish_usage(connection, canonical_json(record))
        assert eventually(
            lambda: totals(metering_db)[0] == len(good), DEADLINE_S, "the good records"
        )
        before = totals(metering_db)
        # A replay of a stored record with a changed body, twice over.
        for changed in (
            dict(good[0], gpu_seconds=good[0]["gpu_seconds"] - 1),
            dict(good[1], tenant_id="someone-else"),
        ):
            corpus.append(
                (
                    "changed replay",
                    canonical_json(changed),
                    None,
                    None,
                    {},
                    "conflicting_duplicate",
                )
            )
        for _name, body, routing_key, headers, extra, _reason in corpus:
            properties = {k: v for k, v in extra.items() if k == "content_type"}
            publish_usage(
                connection,
                body,
                routing_key=routing_key,
                headers=headers,
                **properties,
            )
        # The consumer is still running: a good record after the corpus is rated.
        late = usage()
        publish_usage(connection, canonical_json(late))
        assert eventually(
            lambda: totals(metering_db)[0] == len(good) + 1,
            DEADLINE_S,
            "the record after the corpus",
        )

    assert len(corpus) >= 30
    with ServiceRpcClient("metering", **caller_options()) as rpc:
        eventually(
            lambda: len(rpc.list_dead_letters(limit=1000)) >= len(corpus),
            20,
            "a dead letter for each of the corpus",
        )
        letters = rpc.list_dead_letters(limit=1000)
    got = Counter(letter["reason"] for letter in letters)
    assert got == Counter(reason for *_rest, reason in corpus)
    assert len(letters) == len(corpus)
    after = totals(metering_db)
    assert after[0] == before[0] + 1
    late_seconds = late["gpu_seconds"]
    assert after[1:3] == (before[1] + 1, before[2] + late_seconds)


def _with_corrections(count: int, rng: random.Random) -> list[dict]:
    """``count`` records over several hours and tenants, some corrected, some
    corrected twice in a chain, all as one data centre would send them."""
    now = utcnow().replace(microsecond=0, second=0)
    originals = []
    for n in range(count):
        span = rng.randint(60, 60 * 60 * 5)
        start = now - timedelta(minutes=rng.randint(1, 60 * 20), seconds=span)
        count_ = rng.randint(1, 8)
        originals.append(
            usage(
                record_id=f"o-{n}",
                tenant_id=f"tenant-{n % 7}",
                voucher_code=None,
                gpu_count=count_,
                gpu_seconds=rng.randint(0, count_ * span),
                started_at=format_ts(start),
                ended_at=format_ts(start + timedelta(seconds=span)),
            )
        )
    records = list(originals)
    for n, original in enumerate(rng.sample(originals, count // 4)):
        first = dict(
            original,
            record_id=f"c1-{n}",
            correction_of=original["record_id"],
            gpu_seconds=original["gpu_seconds"] // 2,
        )
        records.append(first)
        if n % 3 == 0:  # a correction of a correction
            records.append(
                dict(
                    first,
                    record_id=f"c2-{n}",
                    correction_of=first["record_id"],
                    gpu_seconds=first["gpu_seconds"] // 3,
                )
            )
    return records


def _in_order_rollups(records: list[dict], sqlite_url: str) -> dict:
    """The rollups when every record arrives in order, one at a time."""
    upgrade("metering", sqlite_url)
    engine = make_engine(sqlite_url)

    registry = CachedRegistry(RegistryCacheState(ttl_s=300), FakeRegistry())
    with sessionmaker(engine, expire_on_commit=False)() as session:
        for record in records:
            outcome = ingest.process_batch(session, registry, [raw_message(record)])
            assert not outcome.refused, outcome.refused
        rows = session.execute(store._ROLLUPS.select()).mappings().all()
    engine.dispose()
    return {
        (
            r["datacenter_id"],
            r["city"],
            r["tenant_id"],
            r["voucher_code"],
            r["gpu_model"],
            r["hour"].replace(tzinfo=None),
        ): [r["records"], r["gpu_seconds"], r["cost_fen"]]
        for r in rows
        if r["records"] or r["gpu_seconds"] or r["cost_fen"]
    }


def start_metering(amqp_uri: str, db_url: str, **env) -> subprocess.Popen:
    return start_service(
        "metering",
        dict(
            os.environ,
            AMQP_URI=amqp_uri,
            DATABASE_URL=db_url,
            LOG_LEVEL="WARNING",
            **env,
        ),
    )


def wait_consumers(connection, count: int) -> None:
    assert eventually(
        lambda: bus.consumers(connection, USAGE_QUEUE.name) >= count,
        60,
        f"{count} consumers on {USAGE_QUEUE.name}",
    )


def test_two_processes_random_order_with_corrections_roll_up_as_in_order(
    registry_stand_in, metering_db, sqlite_url
):
    rng = random.Random(5)
    records = _with_corrections(1200, rng)
    expected = _in_order_rollups(records, sqlite_url)
    shuffled = records[:]
    rng.shuffle(shuffled)
    processes = [
        start_metering(registry_stand_in, metering_db, BATCH_SIZE="50", CONSUMERS="2")
        for _ in range(2)
    ]
    try:
        with Connection(registry_stand_in) as connection:
            wait_consumers(connection, 4)
            for record in shuffled + shuffled[:100]:  # and some delivered twice
                publish_usage(connection, canonical_json(record))
            assert eventually(
                lambda: totals(metering_db)[0] == len(records),
                DEADLINE_S,
                "every record stored",
            )
            # and the duplicates too: a record stored twice would show below
            bus.wait_acked(registry_stand_in, USAGE_QUEUE.name, len(shuffled) + 100)
    finally:
        for process in processes:
            stop(process)
    assert rollups(metering_db) == expected
    effective = {r["record_id"] for r in records} - {
        r["correction_of"] for r in records
    }
    assert totals(metering_db)[2] == sum(
        r["gpu_seconds"] for r in records if r["record_id"] in effective
    )


def _stored_ids(url: str) -> set[str]:
    with psycopg.connect(url) as db:
        return {row[0] for row in db.execute("SELECT record_id FROM usage_records")}


def _dead_letter_ids(url: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    with psycopg.connect(url) as db:
        for record_id, reason in db.execute(
            "SELECT record_id, reason FROM dead_letters"
        ):
            found.setdefault(reason, set()).add(record_id)
    return found


def test_two_processes_rival_corrections_store_one_each_and_count_once(
    registry_stand_in, metering_db, sqlite_url
):
    """Each original corrected by two rivals, rated by two processes at once:
    exactly one rival is stored, the other is ``already_corrected``, and the
    rollups are those of the records stored (nothing counted twice)."""
    rng = random.Random(15)
    originals = _with_corrections(300, rng)[:300]
    rivals, chains = [], []
    for n, original in enumerate(originals):
        for side, share in (("a", 2), ("b", 3)):
            rivals.append(
                dict(
                    original,
                    record_id=f"r{side}-{n}",
                    correction_of=original["record_id"],
                    gpu_seconds=original["gpu_seconds"] // share,
                )
            )
        if n % 3 == 0:  # a chain on one rival: fine whichever wins
            chains.append(
                dict(rivals[-2], record_id=f"c2-{n}", correction_of=f"ra-{n}")
            )
    by_id = {r["record_id"]: r for r in originals + rivals + chains}
    # Rivals in alternating runs of a batch each, so that the consumers of both
    # processes hold the two corrections of a record at the same time.
    side_a, side_b = rivals[0::2], rivals[1::2]
    contended = []
    for start in range(0, len(side_a), 50):
        contended += side_a[start : start + 50] + side_b[start : start + 50]
    mixed = chains + rng.sample(rivals, 100)  # some rivals delivered again
    rng.shuffle(mixed)
    sent = originals + contended + mixed
    processes = [
        start_metering(registry_stand_in, metering_db, BATCH_SIZE="50", CONSUMERS="2")
        for _ in range(2)
    ]
    try:
        with Connection(registry_stand_in) as connection:
            wait_consumers(connection, 4)
            publish_usage(connection, *(canonical_json(r) for r in sent))
            bus.wait_acked(registry_stand_in, USAGE_QUEUE.name, len(sent))
    finally:
        for process in processes:
            stop(process)
    stored = _stored_ids(metering_db)
    refused = set(by_id) - stored
    for n in range(len(originals)):
        assert len({f"ra-{n}", f"rb-{n}"} & stored) == 1, n
    assert refused == {r["record_id"] for r in rivals} - stored
    assert _dead_letter_ids(metering_db) == {"already_corrected": refused}
    kept = [by_id[record_id] for record_id in sorted(stored)]
    assert rollups(metering_db) == _in_order_rollups(kept, sqlite_url)
    effective = stored - {by_id[record_id]["correction_of"] for record_id in stored}
    assert totals(metering_db)[:3] == (
        len(stored),
        len(effective),
        sum(by_id[record_id]["gpu_seconds"] for record_id in effective),
    )


def test_sigkill_mid_stream_then_restart_loses_and_doubles_nothing(
    registry_stand_in, metering_db
):
    count = 50_000
    code = voucher("SH")
    bodies = [
        canonical_json(
            usage(record_id=f"k-{n}", voucher_code=code, gpu_seconds=n % 7200)
        )
        for n in range(count)
    ]
    expected_seconds = sum(n % 7200 for n in range(count))
    with Connection(registry_stand_in) as connection:
        bus.usage_rated_queue(connection, durable=True)
        USAGE_EXCHANGE(connection.default_channel).declare()
        USAGE_QUEUE(connection.default_channel).declare()  # as metering will
        publish_usage(connection, *bodies)  # all in flight before metering starts
        first = start_metering(registry_stand_in, metering_db)
        try:
            assert eventually(
                lambda: totals(metering_db)[0] >= 5_000, 60, "5 000 records stored"
            )
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            stop(first)
        stored_at_kill = totals(metering_db)[0]
        assert stored_at_kill < count, "metering finished before it could be killed"
        second = start_metering(registry_stand_in, metering_db)
        try:
            assert eventually(
                lambda: totals(metering_db)[0] == count, 120, "every record stored"
            )
            assert eventually(
                lambda: bus.ready(connection, "test.usage_rated") >= count,
                60,
                "an event for every record",
            )
        finally:
            stop(second)
    assert totals(metering_db) == (
        count,
        count,
        expected_seconds,
        totals(metering_db)[3],
    )
    with psycopg.connect(metering_db) as db:
        cost = db.execute("SELECT sum(cost_fen) FROM usage_records").fetchone()[0]
    assert totals(metering_db)[3] == cost


def test_a_message_that_crashes_even_alone_ends_parked(
    registry_stand_in, metering_db, container_factory, monkeypatch
):
    """A poison message is retried a bounded number of times, then parked
    (issue 16, with the exception) and acked: the records around it are
    rated and the queue does not wedge; its replay, once the cause is gone,
    rates it."""

    real_check = ingest.check

    def check(registry, message, index, rated_at):
        if b'"poison-1"' in message.body:
            raise RuntimeError("this record always crashes")
        return real_check(registry, message, index, rated_at)

    monkeypatch.setattr(ingest, "check", check)
    monkeypatch.setattr(batching, "RETRY_PAUSE_S", 0.05)
    config = {
        DATABASE_URL: metering_db,
        REGISTRY_CACHE_TTL_S: 30,
        "MAX_DELIVERY_ATTEMPTS": 3,
        "BATCH_WAIT_MS": 200,
    }
    with nameko.config.patch(config):
        container_factory(MeteringService).start()
        before = [usage(record_id=f"before-{n}") for n in range(5)]
        after = [usage(record_id=f"after-{n}") for n in range(5)]
        with Connection(registry_stand_in) as connection:
            for record in before:
                publish_usage(connection, canonical_json(record))
            publish_usage(connection, canonical_json(usage(record_id="poison-1")))
            for record in after:
                publish_usage(connection, canonical_json(record))
            assert eventually(
                lambda: totals(metering_db)[0] == 10, DEADLINE_S, "ten records"
            )

            [parked] = eventually(parked_events, 30, "the poison message parked")
            assert parked["event_id"] is None or "poison" in parked["event_id"]
            assert parked["reason"] == "RuntimeError: this record always crashes"
            assert (parked["kind"], parked["attempts"]) == ("failed", 3)
            assert dead_letters() == []  # not the data centre's fault

            def drained():
                return bus.ready(connection, USAGE_QUEUE.name) == 0

            assert eventually(drained, 10, f"{USAGE_QUEUE.name} drained")
        monkeypatch.setattr(ingest, "check", real_check)  # the bug is fixed
        with ServiceRpcClient("metering", **caller_options()) as rpc:
            replayed = rpc.replay_parked_event(parked["id"])
        assert replayed["outcome"] == "applied", replayed
    assert totals(metering_db)[:2] == (11, 11)
    with psycopg.connect(metering_db) as db:
        assert db.execute("SELECT count(*) FROM delivery_attempts").fetchone()[0] == 0
