"""Holds (issue 15): the pure rule, and batch by batch on SQLite as ingest
decides it, in any arrival order and any split into batches."""

import json
import random
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from services.common import contracts
from services.common.db import make_engine
from services.common.units import format_ts, utcnow
from services.metering import ingest
from services.metering.domain import holds
from services.metering.domain.rollups import hour_of
from services.metering.models import Base, CapacityBucket, UsageRecord
from services.metering.registry import CachedRegistry, RegistryCacheState
from tests.support.metering_data import (
    DATACENTER_ID,
    FakeRegistry,
    raw_message,
    usage,
    voucher,
)

H800 = 256  # registered at DATACENTER_ID (metering_data.DATACENTER)
ASCEND = 512
REGISTERED = {(DATACENTER_ID, "H800"): H800, (DATACENTER_ID, "Ascend-910B"): ASCEND}
HOUR = timedelta(hours=1)
# A whole hour, well in the past: every test's records are in its buckets.
BASE = hour_of(utcnow()) - timedelta(hours=30)


@pytest.fixture
def registry():
    return CachedRegistry(RegistryCacheState(ttl_s=30), FakeRegistry())


def record(record_id, start, hours=1.0, count=128, **overrides):
    """A record of ``count`` H800s busy all of ``[start, start + hours)``."""
    end = start + timedelta(hours=hours)
    return usage(
        record_id=record_id,
        started_at=format_ts(start),
        ended_at=format_ts(end),
        gpu_count=count,
        gpu_seconds=count * int((end - start).total_seconds()),
        **overrides,
    )


def held(session):
    rows = session.execute(
        select(UsageRecord.record_id, UsageRecord.hold).where(
            UsageRecord.hold.is_not(None)
        )
    )
    return {rid: json.loads(hold) for rid, hold in rows}


def events(outcome, name):
    return [out.payload for out in outcome.outgoing if out.routing_key.endswith(name)]


# -- the pure rule ----------------------------------------------------------------


@given(
    seconds=st.integers(0, 10**9),
    start=st.integers(0, 10**7),
    span=st.integers(1, 31 * 86400),
)
def test_hour_shares_sum_to_the_records_gpu_seconds(seconds, start, span):
    started = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=start)
    ended = started + timedelta(seconds=span)
    shares = holds.hour_shares(seconds, started, ended)
    assert sum(share for _, share in shares) == seconds
    assert all(share > 0 for _, share in shares)
    assert all(started - HOUR < hour < ended for hour, _ in shares)


def test_the_records_over_the_line_in_canonical_order_are_held():
    t = BASE
    claims = [
        holds.Claim(t + timedelta(minutes=10), "b", 400),
        holds.Claim(t, "z", 400),
        holds.Claim(t + timedelta(minutes=10), "a", 400),
        holds.Claim(t + timedelta(minutes=20), "c", 1),
    ]
    # z (t), a (t+10, "a" < "b"), b, c: 400, 800, 1200, 1201 against 1000
    assert holds.over_capacity(claims, 1000) == {"b", "c"}
    assert holds.over_capacity(claims, 1201) == set()


def test_double_claims_need_a_shared_gpu_and_overlapping_time():
    def span(rid, start_h, end_h, *uuids, correction_of=None):
        return holds.GpuSpan(
            rid,
            BASE + start_h * HOUR,
            BASE + end_h * HOUR,
            frozenset(uuids),
            correction_of,
        )

    spans = [
        span("a", 0, 2, "GPU-1", "GPU-2"),
        span("b", 1, 3, "GPU-2"),  # overlaps a on GPU-2
        span("c", 2, 4, "GPU-1"),  # touches a at 2: half-open, no overlap
        span("d", 0, 2, "GPU-9"),  # another GPU
        span("e", 0, 2, "GPU-1", correction_of="a"),  # corrects a: never with it
    ]
    assert holds.double_claims(spans) == {"a": {"b"}, "b": {"a"}}
    spans.append(span("f", 3, 5, "GPU-1"))  # overlaps c on GPU-1
    assert holds.double_claims(spans)["c"] == {"f"}


# -- batch by batch, as ingest decides --------------------------------------------


def test_over_capacity_holds_the_record_over_the_line(session, registry):
    first = [record(f"r{n}", BASE, voucher_code=voucher("SH")) for n in (1, 2)]
    outcome = ingest.process_batch(session, registry, [raw_message(r) for r in first])
    assert held(session) == {}
    assert all(e.get("hold") is None for e in events(outcome, "usage_rated"))

    third = record("r3", BASE + timedelta(minutes=5), voucher_code=voucher("SH"))
    outcome = ingest.process_batch(session, registry, [raw_message(third)])
    (rated,) = events(outcome, "usage_rated")
    hour = format_ts(BASE)
    assert rated["hold"] == {
        "reason": "over_capacity",
        "evidence": {
            "datacenter_id": DATACENTER_ID,
            "gpu_model": "H800",
            "hour": hour,
            "inventory": H800,
            "capacity_gpu_seconds": H800 * 3600,
            "bucket_gpu_seconds": 2 * 128 * 3600 + 128 * 55 * 60,
        },
    }
    contracts.load_event("usage_rated", rated)  # the contract's shape
    assert set(held(session)) == {"r3"}


def test_a_late_record_that_sorts_earlier_holds_an_announced_one(session, registry):
    code = voucher("SH")
    late_starters = [
        record(f"late{n}", BASE + timedelta(minutes=30), 0.5, voucher_code=code)
        for n in (1, 2)
    ]
    outcome = ingest.process_batch(
        session, registry, [raw_message(r) for r in late_starters]
    )
    assert held(session) == {}
    early = record("early", BASE, 1.0, count=256, voucher_code=code)
    outcome = ingest.process_batch(session, registry, [raw_message(early)])
    # early fills the hour alone (256 × 3600): both late starters go over
    assert set(held(session)) == {"late1", "late2"}
    (rated,) = events(outcome, "usage_rated")
    assert rated.get("hold") is None
    announced = events(outcome, "usage_hold")
    assert sorted(e["record_id"] for e in announced) == ["late1", "late2"]
    for event in announced:
        loaded = contracts.load_event("usage_hold", event)
        assert loaded["hold"]["reason"] == "over_capacity"
        assert loaded["hold"]["evidence"]["bucket_gpu_seconds"] == (256 + 128) * 3600
        assert event["event_id"] == contracts.event_id(
            "usage_hold", DATACENTER_ID, event["record_id"]
        )
    # Again: nothing new is held, nothing announced again.
    again = record("later", BASE + 2 * HOUR, voucher_code=code)
    outcome = ingest.process_batch(session, registry, [raw_message(again)])
    assert events(outcome, "usage_hold") == []


def test_a_correction_replaces_the_record_in_its_buckets(session, registry):
    first = record("big", BASE, count=256)
    ingest.process_batch(session, registry, [raw_message(first)])
    # Corrected down to 128 GPUs: the original stops counting.
    fixed = record("big-v2", BASE, count=128, correction_of="big")
    ingest.process_batch(session, registry, [raw_message(fixed)])
    other = record("other", BASE, count=128)
    ingest.process_batch(session, registry, [raw_message(other)])
    assert held(session) == {}
    bucket = session.get(CapacityBucket, (DATACENTER_ID, "H800", BASE))
    assert bucket.gpu_seconds == 2 * 128 * 3600


def test_double_claim_holds_both_and_names_the_other(session, registry):
    code = voucher("CD")
    a = record("a", BASE, count=2, gpu_uuids=["GPU-aa", "GPU-bb"], voucher_code=code)
    ingest.process_batch(session, registry, [raw_message(a)])
    b = record(
        "b",
        BASE + timedelta(minutes=30),
        count=1,
        gpu_uuids=["GPU-bb"],
        voucher_code=code,
    )
    outcome = ingest.process_batch(session, registry, [raw_message(b)])
    (rated,) = events(outcome, "usage_rated")
    assert rated["gpu_uuids"] == ["GPU-bb"]
    assert rated["hold"] == {
        "reason": "double_claim",
        "evidence": {"records": ["a"], "gpu_uuids": ["GPU-bb"]},
    }
    (hold,) = events(outcome, "usage_hold")
    assert hold["record_id"] == "a"
    assert hold["hold"]["evidence"]["records"] == ["b"]
    assert set(held(session)) == {"a", "b"}


def test_a_correction_never_double_claims_against_what_it_corrects(session, registry):
    a = record("a", BASE, count=1, gpu_uuids=["GPU-aa"])
    ingest.process_batch(session, registry, [raw_message(a)])
    fixed = record("a2", BASE, count=1, gpu_uuids=["GPU-aa"], correction_of="a")
    ingest.process_batch(session, registry, [raw_message(fixed)])
    # and a correction that comes before what it corrects
    late = record("c2", BASE + 3 * HOUR, count=1, gpu_uuids=["GPU-cc"])
    late["correction_of"] = "c"
    ingest.process_batch(session, registry, [raw_message(late)])
    c = record("c", BASE + 3 * HOUR, count=1, gpu_uuids=["GPU-cc"])
    ingest.process_batch(session, registry, [raw_message(c)])
    assert held(session) == {}


@pytest.mark.parametrize(
    ("uuids", "why"),
    [
        (["GPU-1", "GPU-1"], "named twice"),
        (["GPU-1"], "names 1 GPUs but gpu_count is 2"),
        (["gpu-1", "GPU-2"], "String does not match"),
        ("GPU-1,GPU-2", "Not a valid list"),
        ([7, "GPU-2"], "Not a valid string"),
    ],
)
def test_malformed_gpu_uuids_are_a_schema_dead_letter(session, registry, uuids, why):
    bad = record("bad", BASE, count=2, gpu_uuids=uuids)
    outcome = ingest.process_batch(session, registry, [raw_message(bad)])
    ((_, refused),) = outcome.refused
    assert refused.reason == "schema"
    assert why in refused.detail_text
    assert "gpu_uuids" in refused.detail_text


def test_records_without_gpu_uuids_keep_their_digest():
    plain = record("p", BASE)
    loaded = contracts.UsageRecordSchema().load(plain)
    assert "gpu_uuids" not in contracts.UsageRecordSchema().dump(loaded)


# -- any order, any batches -------------------------------------------------------

GPUS = [f"GPU-{n}" for n in range(6)]


@st.composite
def streams(draw):
    """Records of DATACENTER_ID in a few hours, sometimes naming GPUs, with
    an arrival order and a split into batches."""
    count = draw(st.integers(1, 14))
    records = []
    for n in range(count):
        start = BASE + timedelta(minutes=draw(st.integers(0, 180)))
        minutes = draw(st.integers(1, 150))
        gpus = draw(st.integers(1, 200))
        end = start + timedelta(minutes=minutes)
        seconds = draw(st.integers(0, gpus * minutes * 60))
        uuids = None
        if gpus <= len(GPUS) and draw(st.booleans()):
            uuids = draw(st.permutations(GPUS))[:gpus]
        records.append(
            usage(
                record_id=f"r{n}",
                gpu_model=draw(st.sampled_from(["H800", "H800", "Ascend-910B"])),
                started_at=format_ts(start),
                ended_at=format_ts(end),
                gpu_count=gpus,
                gpu_seconds=seconds,
                gpu_uuids=uuids,
                voucher_code=None,
            )
        )
    order = draw(st.permutations(records))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, count - 1)), max_size=4)))
    batches, last = [], 0
    for cut in [*cuts, count]:
        if order[last:cut]:
            batches.append(order[last:cut])
        last = cut
    return records, batches


def _loaded(records):
    schema = contracts.UsageRecordSchema()
    return [schema.load(r) for r in records]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(stream=streams())
def test_any_order_and_batches_hold_the_same_records(registry, stream):
    records, batches = stream
    expected = holds.held_set(_loaded(records), REGISTERED)
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'm.db'}")
        Base.metadata.create_all(engine)
        with sessionmaker(engine, expire_on_commit=False)() as session:
            for batch in batches:
                ingest.process_batch(session, registry, [raw_message(r) for r in batch])
            assert set(held(session)) == expected
        engine.dispose()


def test_a_busy_hour_in_random_orders_holds_the_same_records(session, registry):
    rng = random.Random(15)
    records = [
        record(
            f"r{n}",
            BASE + timedelta(minutes=rng.randrange(60)),
            0.5,
            count=rng.randrange(1, 200),
        )
        for n in range(40)
    ]
    expected = holds.held_set(_loaded(records), REGISTERED)
    assert expected  # the hour is over
    rng.shuffle(records)
    for start in range(0, len(records), 7):
        batch = records[start : start + 7]
        ingest.process_batch(session, registry, [raw_message(r) for r in batch])
    assert set(held(session)) == expected
