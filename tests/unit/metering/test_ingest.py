"""metering's use cases on SQLite with a fake registry: dedup, rollups, reads."""

import random
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from services.common.contracts import canonical_json
from services.common.errors import InvalidRequest
from services.common.units import format_ts, utcnow
from services.metering import dead_letters, ingest, reports, store
from services.metering.domain import rollups
from services.metering.domain.validation import Reason, Refused
from services.metering.models import (
    DeadLetter,
    DeliveryAttempt,
    ParkedEvent,
    UsageRecord,
    UsageRollup,
    UsageTotal,
)
from services.metering.parking import MeteringParkingStore
from services.metering.registry import CachedRegistry, RegistryCacheState
from tests.support.metering_data import (
    DATACENTER_ID,
    KEY_ID,
    FakeRegistry,
    capacity,
    raw_message,
    signed_headers,
    usage,
    voucher,
)


@pytest.fixture
def fake():
    return FakeRegistry()


@pytest.fixture
def registry(fake):
    return CachedRegistry(RegistryCacheState(ttl_s=30), fake)


def rollup_totals(session):
    """(records, gpu_seconds, cost_fen) summed over every hourly bucket."""
    row = session.execute(
        select(
            func.sum(UsageRollup.records),
            func.sum(UsageRollup.gpu_seconds),
            func.sum(UsageRollup.cost_fen),
        )
    ).one()
    return tuple(int(value or 0) for value in row)


def process(session, registry, message):
    try:
        return ingest.process(session, registry, message)
    except Refused as refused:
        dead_letters.store_dead_letter(session, message, refused)
        return refused.reason


def test_voucher_record_is_rated_stored_rolled_up_and_announced(session, registry):
    record = usage(voucher_code=voucher("SH"))
    [event] = process(session, registry, raw_message(record))
    assert event.routing_key == "shanghai.usage_rated"
    assert event.payload["cost_fen"] == 2 * 1800
    assert event.payload["record_id"] == record["record_id"]
    row = session.scalar(select(UsageRecord))
    assert (row.city, row.cost_fen, row.unit_price_fen_per_gpu_hour) == (
        "shanghai",
        3600,
        1800,
    )
    assert rollup_totals(session) == (1, 7200, 3600)


def test_voucherless_record_is_rated_without_an_event(session, registry):
    assert process(session, registry, raw_message(usage())) == []
    assert session.scalar(select(func.count()).select_from(UsageRecord)) == 1


def test_same_record_again_changes_nothing_and_repeats_the_same_event(
    session, registry
):
    record = usage(voucher_code=voucher("CD"))
    [first] = process(session, registry, raw_message(record))
    [again] = process(session, registry, raw_message(record))
    assert again.payload == first.payload
    assert session.scalar(select(func.count()).select_from(UsageRecord)) == 1
    assert rollup_totals(session)[0] == 1


def test_same_id_with_another_body_is_a_conflicting_duplicate(session, registry):
    record = usage()
    process(session, registry, raw_message(record))
    changed = dict(record, gpu_seconds=record["gpu_seconds"] - 1)
    assert process(session, registry, raw_message(changed)) == (
        Reason.CONFLICTING_DUPLICATE
    )
    letter = session.scalar(select(DeadLetter))
    assert letter.record_id == record["record_id"]
    assert rollup_totals(session)[1] == 7200


def test_rollup_adds_records_of_the_same_bucket(session, registry):
    code = voucher("SH")
    template = usage(voucher_code=code)
    for _ in range(3):
        record = dict(template, record_id=usage()["record_id"])
        process(session, registry, raw_message(record))
    assert rollup_totals(session)[:2] == (3, 21600)
    assert set(session.scalars(select(UsageRollup.voucher_code))) == {code}


@pytest.mark.parametrize(
    "message, reason",
    [
        (
            lambda: raw_message(usage(), routing_key="nowhere-01.usage"),
            "unknown_datacenter",
        ),
        (lambda: raw_message(usage(), headers={"x-key-id": KEY_ID}), "bad_signature"),
        (lambda: raw_message(body=b"\x00not json"), "schema"),
        (lambda: raw_message(usage(gpu_count=0)), "schema"),
        (lambda: raw_message(usage(), content_type="text/plain"), "schema"),
        (lambda: raw_message(usage(datacenter_id="other")), "datacenter_mismatch"),
        (lambda: raw_message(usage(gpu_model="B200")), "unknown_gpu_model"),
        (
            lambda: raw_message(usage(gpu_count=257, gpu_seconds=257)),
            "exceeds_inventory",
        ),
        (lambda: raw_message(usage(voucher_code="SH-NOPE")), "unknown_voucher"),
        (lambda: raw_message(usage(voucher_code=voucher("ZZ"))), "unknown_voucher"),
    ],
)
def test_refused_message_is_stored_as_a_dead_letter(session, registry, message, reason):
    raw = message()
    assert process(session, registry, raw) == reason
    [listed] = reports.list_dead_letters(session)
    assert listed["reason"] == reason
    assert listed["datacenter_id"] == raw.routing_key.split(".")[0]
    letter = session.scalar(select(DeadLetter))
    assert letter.body == raw.body.decode("utf-8", "replace").replace("\x00", "\ufffd")
    assert session.scalar(select(func.count()).select_from(UsageRecord)) == 0


def test_registry_is_cached_and_refetched_for_an_unknown_key(session, registry, fake):
    process(session, registry, raw_message(usage()))
    process(session, registry, raw_message(usage()))
    assert fake.calls.count("get_datacenter") == 1
    assert fake.calls.count("datacenter_signing_keys") == 1
    fake.keys = fake.keys + [{"key_id": "k2", "secret": "new"}]

    body = canonical_json(usage())
    message = raw_message(body=body, headers=signed_headers(body, "k2", "new"))
    assert process(session, registry, message) == []
    assert fake.calls.count("datacenter_signing_keys") == 2


def test_capacity_report_is_stored_once_and_feeds_utilisation(session, registry):
    now = utcnow().replace(microsecond=0)
    for seconds_ago in (600, 300):
        report = capacity(now - timedelta(seconds=seconds_ago), total=4, allocated=1)
        message = raw_message(report, routing_key=f"{DATACENTER_ID}.capacity")
        assert process(session, registry, message) == []
        assert process(session, registry, message) == []  # duplicate: ignored
    process(session, registry, raw_message(usage(gpu_seconds=1200, gpu_count=1)))
    overview = reports.usage_overview(session, 24, now=now)
    row = overview["datacenters"][DATACENTER_ID]
    # Reports began inside the window: the first stands from its hour's start.
    first_hour = rollups.hour_of(now - timedelta(seconds=600))
    assert row["capacity_gpu_seconds_window"] == 4 * int(
        (now - first_hour).total_seconds()
    )
    assert row["gpu_seconds_window"] == 1200
    assert row["gpu_seconds_covered"] <= 1200
    assert row["utilisation_window"] == pytest.approx(
        row["gpu_seconds_covered"] / row["capacity_gpu_seconds_window"]
    )
    assert row["records_total"] == 1


def test_overview_and_listing_validate_their_arguments(session):
    with pytest.raises(InvalidRequest):
        reports.usage_overview(session, 0)
    with pytest.raises(InvalidRequest):
        reports.list_dead_letters(session, limit=0)
    assert reports.usage_overview(session) == {"datacenters": {}}


def test_a_message_failing_alone_is_counted_then_parked(session):
    """Not a dead letter: it passed every check; the platform failed it
    (issue 16). Parked whole, with the headers a replay checks again."""
    message = raw_message(usage())
    other = raw_message(usage())
    error = RuntimeError("boom at the database")
    for _ in range(2):
        assert not dead_letters.record_failure(session, message, error, 3)
    assert not dead_letters.record_failure(session, other, error, 3)
    assert session.scalar(select(ParkedEvent)) is None
    assert dead_letters.record_failure(session, message, error, 3)  # the third time
    assert session.scalar(select(DeadLetter)) is None
    parked = session.scalar(select(ParkedEvent))
    assert (parked.kind, parked.attempts) == ("failed", 3)
    assert parked.reason == "RuntimeError: boom at the database"
    assert parked.body == message.body.decode()
    assert parked.headers == message.headers
    assert (
        dead_letters.parked_message(
            MeteringParkingStore(session).parked_event(parked.id)
        ).body
        == message.body
    )
    # Its count is gone (a later copy starts afresh); the other's stays.
    assert [a.attempts for a in session.scalars(select(DeliveryAttempt))] == [1]
    dead_letters.forget_failures(session, other)
    assert session.scalar(select(func.count()).select_from(DeliveryAttempt)) == 0


def test_the_brokers_delivery_count_counts_when_it_says_more(session):
    message = raw_message(usage())
    message.headers["x-delivery-count"] = 4  # a quorum queue, before a restart
    assert dead_letters.record_failure(session, message, RuntimeError("x"), 5)
    assert session.scalar(select(ParkedEvent)).attempts == 5


def test_a_failing_batch_leaves_nothing_and_the_connection_usable(
    session, registry, monkeypatch
):
    good = raw_message(usage())

    def broken(*args, **kwargs):
        raise RuntimeError("rollups down")

    monkeypatch.setattr(store, "update_rollups", broken)
    with pytest.raises(RuntimeError):
        ingest.process_batch(session, registry, [good])
    assert session.scalar(select(func.count()).select_from(UsageRecord)) == 0
    monkeypatch.undo()
    ingest.process_batch(session, registry, [good])
    assert session.scalar(select(func.count()).select_from(UsageRecord)) == 1
    assert rollup_totals(session)[0] == 1


def test_a_freshly_reporting_datacenter_is_not_read_as_full(session, registry):
    """Hours of jobs that ran before the first capacity report must not be
    divided by the minutes of capacity reported since."""
    now = utcnow().replace(microsecond=0, second=0, minute=30)
    if now > utcnow():
        now -= timedelta(hours=1)
    # Six hours of one GPU busy, then capacity reports of 8 GPUs from :10.
    job = usage(
        gpu_count=1,
        gpu_seconds=6 * 3600,
        started_at=format_ts(now - timedelta(hours=6)),
        ended_at=format_ts(now),
    )
    process(session, registry, raw_message(job))
    for minutes_ago in (20, 15, 10, 5):
        report = capacity(now - timedelta(minutes=minutes_ago), total=8, allocated=1)
        process(
            session,
            registry,
            raw_message(report, routing_key=f"{DATACENTER_ID}.capacity"),
        )
    row = reports.usage_overview(session, 24, now=now)["datacenters"][DATACENTER_ID]
    assert row["gpu_seconds_window"] == 6 * 3600
    # Counted from the hour of the first report (:00): 30 minutes of the job,
    # against 8 GPUs for those 30 minutes.
    assert row["gpu_seconds_covered"] == 1800
    assert row["capacity_gpu_seconds_window"] == 8 * 1800
    assert row["utilisation_window"] == pytest.approx(1 / 8)


def _with_corrections(
    count: int, rng: random.Random, rivals: bool = False
) -> list[dict]:
    """Records, some corrected (by a chain now and then), ids unique; with
    ``rivals``, some corrected twice over (one of the two is refused)."""
    code = voucher("SH")
    records = []
    for n in range(count):
        record = usage(record_id=f"t-{n}", voucher_code=code, gpu_seconds=n * 37)
        records.append(record)
        if rng.random() < 0.3:
            fix = dict(record, record_id=f"t-{n}-fix", gpu_seconds=n * 11)
            fix["correction_of"] = record["record_id"]
            records.append(fix)
            if rivals and rng.random() < 0.5:
                rival = dict(fix, record_id=f"t-{n}-rival", gpu_seconds=n * 5)
                records.append(rival)
            if rng.random() < 0.3:
                again = dict(fix, record_id=f"t-{n}-fix2", gpu_seconds=n)
                again["correction_of"] = fix["record_id"]
                records.append(again)
    return records


def _stored(session) -> dict[str, tuple[str | None, int]]:
    """record_id → (correction_of, gpu_seconds) of every stored record."""
    rows = session.execute(
        select(
            UsageRecord.record_id, UsageRecord.correction_of, UsageRecord.gpu_seconds
        )
    )
    return {record_id: (of, seconds) for record_id, of, seconds in rows}


def _dead_letter_reasons(session) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for letter in reports.list_dead_letters(session, limit=10_000):
        found.setdefault(letter["reason"], set()).add(letter["record_id"])
    return found


def test_a_second_correction_of_a_record_is_refused_already_corrected(
    session, registry
):
    original = usage(gpu_seconds=3600)
    first = usage(correction_of=original["record_id"], gpu_seconds=1800)
    second = usage(correction_of=original["record_id"], gpu_seconds=900)
    chain = usage(correction_of=first["record_id"], gpu_seconds=600)
    for record in (original, first):
        assert process(session, registry, raw_message(record)) == []
    assert process(session, registry, raw_message(second)) == "already_corrected"
    assert process(session, registry, raw_message(first)) == []  # a redelivery
    assert process(session, registry, raw_message(chain)) == []  # a chain is fine
    assert process(session, registry, raw_message(second)) == "already_corrected"
    letters = reports.list_dead_letters(session, reason="already_corrected")
    assert [letter["record_id"] for letter in letters] == [second["record_id"]] * 2
    assert first["record_id"] in letters[0]["detail"]
    assert set(_stored(session)) == {r["record_id"] for r in (original, first, chain)}
    assert rollup_totals(session)[:2] == (1, 600)


def test_rival_corrections_in_one_batch_the_first_in_it_wins(session, registry):
    original = usage(gpu_seconds=3600)
    rivals = [usage(correction_of=original["record_id"], gpu_seconds=n) for n in (7, 8)]
    # a correction before its original holds it as well
    batch = [rivals[1], original, rivals[0], rivals[0]]
    outcome = ingest.process_batch(session, registry, [raw_message(r) for r in batch])
    assert [(index, refused.reason) for index, refused in outcome.refused] == [
        (2, Reason.ALREADY_CORRECTED),
        (3, Reason.ALREADY_CORRECTED),
    ]
    assert set(_stored(session)) == {original["record_id"], rivals[1]["record_id"]}
    assert rollup_totals(session)[:2] == (1, 8)


@pytest.mark.parametrize("seed", range(4))
def test_all_time_totals_are_the_sum_of_the_rollups_in_any_order(
    session, registry, seed
):
    """usage_totals moves with the rollups in the same transaction: after
    corrections in any order (before their original, in chains, redelivered),
    in batches of any size, the overview's all-time figures are the rollups'."""
    rng = random.Random(seed)
    records = _with_corrections(60, rng, rivals=True)
    arrivals = records + rng.sample(records, 10)  # and some delivered again
    rng.shuffle(arrivals)
    while arrivals:
        size = rng.randint(1, 25)
        batch, arrivals = arrivals[:size], arrivals[size:]
        ingest.process_batch(session, registry, [raw_message(r) for r in batch])
    stored = _stored(session)
    # of two rival corrections, exactly one is stored; the other is refused
    targets = [of for of, _ in stored.values() if of is not None]
    assert len(targets) == len(set(targets))
    refused = {r["record_id"] for r in records} - set(stored)
    assert refused == {
        r["record_id"] for r in records if r["record_id"].endswith(("-fix", "-rival"))
    } - set(stored)
    assert len(refused) == sum(r["record_id"].endswith("-rival") for r in records)
    assert _dead_letter_reasons(session) == (
        {"already_corrected": refused} if refused else {}
    )
    effective = set(stored) - set(targets)
    expected = rollup_totals(session)
    assert expected[:2] == (
        len(effective),
        sum(stored[record_id][1] for record_id in effective),
    )
    kept = session.execute(
        select(
            func.sum(UsageTotal.records),
            func.sum(UsageTotal.gpu_seconds),
            func.sum(UsageTotal.cost_fen),
        )
    ).one()
    assert tuple(int(value) for value in kept) == expected
    overview = reports.usage_overview(session)["datacenters"][DATACENTER_ID]
    assert (
        overview["records_total"],
        overview["gpu_seconds_total"],
        overview["cost_fen_total"],
    ) == expected
