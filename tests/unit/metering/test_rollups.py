"""Rollup rules without a broker or a database: spreading over hours, the
correction rule, the hand-built event and record dump against the contract."""

import json
from datetime import UTC, datetime, timedelta, timezone
from itertools import permutations

from hypothesis import given
from hypothesis import strategies as st

from services.common import contracts
from services.common.units import format_ts
from services.metering.domain import encoding, rollups, validation
from tests.support import metering_reference as reference
from tests.support.metering_data import DATACENTER, usage, voucher

T0 = datetime(2025, 3, 1, 10, 40, tzinfo=UTC)


def test_a_span_inside_one_hour_stays_in_it():
    assert rollups.spread_over_hours(100, T0, T0 + timedelta(minutes=10)) == [
        (datetime(2025, 3, 1, 10, tzinfo=UTC), 100)
    ]


def test_a_six_hour_job_is_spread_pro_rata():
    shares = rollups.spread_over_hours(6 * 3600, T0, T0 + timedelta(hours=6))
    assert [hour.hour for hour, _ in shares] == [10, 11, 12, 13, 14, 15, 16]
    assert [share for _, share in shares] == [1200, 3600, 3600, 3600, 3600, 3600, 2400]


@given(
    amount=st.integers(min_value=-(10**12), max_value=10**12),
    start_s=st.integers(min_value=0, max_value=10**6),
    span_s=st.integers(min_value=1, max_value=31 * 86400),
)
def test_shares_sum_exactly_and_are_within_one_of_pro_rata(amount, start_s, span_s):
    started = T0 + timedelta(seconds=start_s)
    ended = started + timedelta(seconds=span_s)
    shares = rollups.spread_over_hours(amount, started, ended)
    assert sum(share for _, share in shares) == amount
    for hour, share in shares:
        inside = min(hour + rollups.HOUR, ended) - max(hour, started)
        exact = amount * inside.total_seconds() / span_s
        assert abs(share - exact) <= 1.0 + 1e-6 * abs(exact)
    negated = rollups.spread_over_hours(-amount, started, ended)
    assert [(h, -s) for h, s in negated] == shares  # taking back cancels exactly


def _stored_and_effective(arrivals):
    """Apply the rules record by record, as metering does (a correction of a
    record already corrected is refused, the rest stored): the records stored
    (and what each corrects) and the set of records counting at the end."""
    stored: dict = {}
    counting: set = set()
    for key, corrects in arrivals:
        if corrects is not None and key not in stored:
            held = {k[1] for k, c in stored.items() if c == corrects}
            if rollups.competing_corrections([(key, corrects)], {corrects: held}):
                continue  # already_corrected: not stored
        stored[key] = corrects
        targets = {corrects} & set(stored) - {key} if corrects else set()
        pairs = [(k, c) for k, c in stored.items() if c in ({key} | targets)]
        changes = rollups.effectiveness_changes({key}, targets, pairs)
        for record, sign in changes.items():
            (counting.add if sign > 0 else counting.discard)(record)
    return stored, counting


def _effective_after_all(arrivals):
    return _stored_and_effective(arrivals)[1]


def test_corrections_count_the_same_in_every_arrival_order():
    chain = [
        (("dc", "o"), None),
        (("dc", "c1"), ("dc", "o")),
        (("dc", "c2"), ("dc", "c1")),
        (("dc", "x"), None),
        (("dc", "cx"), ("dc", "x")),
    ]
    results = {frozenset(_effective_after_all(order)) for order in permutations(chain)}
    assert results == {frozenset({("dc", "c2"), ("dc", "cx")})}


def test_a_record_is_corrected_once_the_first_correction_stored_wins():
    records = [
        (("dc", "o"), None),
        (("dc", "a"), ("dc", "o")),
        (("dc", "b"), ("dc", "o")),
        (("dc", "a2"), ("dc", "a")),  # a chain: a correction of a correction
    ]
    for order in permutations(records):
        stored, counting = _stored_and_effective(order)
        winner = next(key for key, _ in order if key[1] in "ab")
        loser = ("dc", "b") if winner == ("dc", "a") else ("dc", "a")
        assert winner in stored and loser not in stored
        targets = [c for c in stored.values() if c is not None]
        assert len(targets) == len(set(targets))  # nothing corrected twice
        # the rule on the set of records stored, whatever their order
        assert counting == set(stored) - set(targets)
        assert ("dc", "o") not in counting
        if winner == ("dc", "a"):
            assert counting == {("dc", "a2")}


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.none() | st.integers(0, 5)),
        min_size=1,
        max_size=12,
        unique_by=lambda pair: pair[0],
    ),
    st.randoms(use_true_random=False),
)
def test_competing_corrections_keep_one_corrector_per_record_in_any_order(records, rng):
    records = [
        (("dc", f"r{n}"), None if c is None or c == n else ("dc", f"r{c}"))
        for n, c in records
    ]
    order = records[:]
    rng.shuffle(order)
    stored, counting = _stored_and_effective(order)
    targets = [c for c in stored.values() if c is not None]
    assert len(targets) == len(set(targets))
    assert counting == set(stored) - set(targets)
    # what is refused is exactly a correction of a record corrected before it
    for key, corrects in records:
        if key not in stored:
            assert corrects is not None and corrects in targets
    # the stored set, replayed in any order, is stored whole and counts the same
    again = list(stored.items())
    rng.shuffle(again)
    assert _stored_and_effective(again) == (stored, counting)


def test_competing_corrections_in_one_batch_and_against_stored_ones():
    o, a, b, c = (("dc", n) for n in "oabc")
    assert rollups.competing_corrections([(a, o), (b, o)], {}) == {b: "a"}
    assert rollups.competing_corrections([(b, o)], {o: {"a"}}) == {b: "a"}
    # its own redelivery is not refused (dedup judges it); a chain is fine
    assert rollups.competing_corrections([(a, o), (c, a)], {o: {"a"}}) == {}


def test_contribution_counts_the_record_once_in_its_start_hour():
    row = dict(
        validation.load_usage(
            usage(
                started_at="2025-03-01T10:40:00Z",
                ended_at="2025-03-01T12:10:00Z",
                gpu_count=1,
                gpu_seconds=5400,
            ),
            DATACENTER["id"],
        ),
        city=None,
        cost_fen=2701,
    )
    parts = rollups.rollup_contribution(row)
    assert [records for _, records, _, _ in parts] == [1, 0, 0]
    assert [seconds for *_, seconds, _ in parts] == [1200, 3600, 600]
    assert sum(cost for *_, cost in parts) == 2701
    assert sum(c for *_, c in rollups.rollup_contribution(row, -1)) == -2701


def test_dump_record_equals_the_schema_dump():
    record = validation.load_usage(usage(voucher_code=voucher("SH")), DATACENTER["id"])
    assert encoding.dump_record(record) == contracts.UsageRecordSchema().dump(record)


def test_usage_rated_event_matches_the_contract():
    record = validation.load_usage(usage(voucher_code=voucher("SH")), DATACENTER["id"])
    rating = reference.rate(record, DATACENTER)
    rated_at = datetime(2025, 3, 1, 12, tzinfo=UTC)
    event = reference.usage_rated_event(record, "shanghai", rating, rated_at)
    expected = contracts.make_event(
        "usage_rated",
        "shanghai",
        event["event_id"],
        **contracts.UsageRecordSchema().dump(record),
        cost_fen=rating.cost_fen,
        unit_price_fen_per_gpu_hour=rating.unit_price_fen_per_gpu_hour,
        datacenter=dict(rating.datacenter),
        occurred_at=rated_at,
    )
    assert event == expected
    contracts.load_event("usage_rated", event)


def test_lock_key_is_stable_and_signed_64_bit():
    key = rollups.lock_key("dc", "r-1")
    assert key == rollups.lock_key("dc", "r-1") != rollups.lock_key("dc", "r-2")
    assert -(2**63) <= key < 2**63


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 1, 1)))
def test_wire_time_is_format_ts(moment):
    aware = moment.replace(tzinfo=UTC)
    assert encoding._wire_time(aware) == format_ts(aware)
    assert encoding._wire_time(moment) == format_ts(aware)


def _spread_as_first_written(amount, started, ended):
    """spread_over_hours before its span shapes were cached: the reference.

    A corrected record is taken out of the rollups by recomputing its
    contribution, so the split must never change between releases.
    """
    span = (ended - started) // timedelta(microseconds=1)
    hour = rollups.hour_of(started)
    if span <= 0 or hour + rollups.HOUR >= ended:
        return [(hour, amount)]
    negative, amount = amount < 0, abs(amount)
    shares, given = [], 0
    while hour < ended:
        boundary = min(hour + rollups.HOUR, ended)
        cumulative = amount * ((boundary - started) // timedelta(microseconds=1))
        cumulative //= span
        shares.append((hour, -(cumulative - given) if negative else cumulative - given))
        given = cumulative
        hour += rollups.HOUR
    return shares


@given(
    st.integers(-(10**12), 10**12),
    st.integers(0, 10**9),
    st.integers(0, 40 * 86_400 * 10**6),
)
def test_spread_is_the_split_first_written(amount, start_us, span_us):
    started = T0 + timedelta(microseconds=start_us)
    ended = started + timedelta(microseconds=span_us)
    expected = _spread_as_first_written(amount, started, ended)
    assert rollups.spread_over_hours(amount, started, ended) == expected
    assert rollups.spread_over_hours(amount, started, ended) == expected  # cached
    row = {
        "datacenter_id": "dc",
        "city": "shanghai",
        "tenant_id": "t",
        "voucher_code": None,
        "gpu_model": "H800",
        "started_at": started,
        "ended_at": ended,
        "gpu_seconds": abs(amount),
        "cost_fen": abs(amount) // 3,
    }
    for sign in (1, -1):
        parts = rollups.rollup_contribution(row, sign)
        seconds = _spread_as_first_written(sign * abs(amount), started, ended)
        costs = _spread_as_first_written(sign * (abs(amount) // 3), started, ended)
        assert [(key[-1], n) for key, _, n, _ in parts] == seconds
        assert [(key[-1], c) for key, _, _, c in parts] == costs
        assert [records for _, records, _, _ in parts] == [sign] + [0] * (
            len(parts) - 1
        )


def test_record_json_is_the_canonical_json_of_the_dump():
    for overrides in ({}, {"voucher_code": voucher("SH")}, {"job_id": "é\n\u2028"}):
        record = validation.load_usage(usage(**overrides), DATACENTER["id"])
        wire = encoding.record_json(record)
        assert wire == contracts.canonical_json(encoding.dump_record(record))
        assert wire == contracts.canonical_json(
            contracts.UsageRecordSchema().dump(record)
        )


def test_usage_rated_body_is_the_event():
    record = validation.load_usage(
        usage(voucher_code=voucher("SH"), tenant_id='t "x" é'), DATACENTER["id"]
    )
    rating = reference.rate(record, DATACENTER)
    rated_at = datetime(2025, 3, 1, 12, tzinfo=UTC)
    body = reference.usage_rated_body(record, "shanghai", rating, rated_at)
    assert json.loads(body) == reference.usage_rated_event(
        record, "shanghai", rating, rated_at
    )
    given_json = reference.usage_rated_body(
        record, "shanghai", rating, rated_at, encoding.record_json(record)
    )
    assert given_json == body


@given(st.text(max_size=40), st.text(min_size=1, max_size=40))
def test_usage_rated_event_id_is_the_contracts_uuid5(datacenter_id, record_id):
    assert encoding.usage_rated_event_id(datacenter_id, record_id) == (
        contracts.event_id("usage_rated", datacenter_id, record_id)
    )


def test_equal_instants_in_other_zones_are_cut_in_their_own_zone():
    india = timezone(timedelta(hours=5, minutes=30))
    started = datetime(2025, 3, 1, 10, 40, tzinfo=UTC)
    ended = started + timedelta(hours=2)
    for first, second in ((UTC, india), (india, UTC)):
        for zone in (first, second):
            a, b = started.astimezone(zone), ended.astimezone(zone)
            assert rollups.spread_over_hours(7200, a, b) == (
                _spread_as_first_written(7200, a, b)
            )
        rollups._hours_of_span.cache_clear()
