"""The hand-written fast path for usage records decides exactly as the schema.

``validation.fast_load_usage`` replaces ``UsageRecordSchema().load`` on the hot
path; marshmallow only words the error of a refused record. These tests hold
the two together over valid records and records mutated in every way a JSON
body can be: a field missing, unknown, null, of another JSON type, at and
past each length and range bound, times swapped, equal, too long apart, in
the future, without a timezone, with an offset, or not timestamps at all.
"""

import json
from datetime import datetime, timedelta

from hypothesis import example, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from services.common import contracts
from services.common.units import format_ts, utcnow
from services.metering.domain import encoding, validation
from tests.support.metering_data import DATACENTER_ID, usage, voucher

SCHEMA = contracts.UsageRecordSchema()
FIELDS = list(validation.RECORD_FIELDS)
LIMITS = {
    "record_id": 128,
    "datacenter_id": 64,
    "tenant_id": 128,
    "gpu_model": 64,
    "source": 32,
    "correction_of": 128,
}


def schema_load(data):
    """What the schema decides: the loaded record, or None when it refuses."""
    try:
        return SCHEMA.load(data)
    except ValidationError:
        return None
    except OverflowError:  # a timestamp before year 1 in UTC (the schema crashes)
        return None


def assert_same_decision(data):
    fast = validation.fast_load_usage(data)
    slow = schema_load(data)
    assert (fast is None) == (slow is None), (data, fast, slow)
    if fast is not None:
        assert fast == slow
        assert encoding.dump_record(fast) == SCHEMA.dump(slow)


# JSON values of every type, including ones near each bound.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=140),
    st.sampled_from(["", "x", "x" * 32, "x" * 33, "x" * 64, "x" * 65, "x" * 128]),
    st.sampled_from(["x" * 129, "2025-01-01T00:00:00", "2025-01-01T00:00:00Z"]),
    st.sampled_from([0, 1, -1, 2**63, 1.0, 0.0, True, False]),
)
json_values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=2),
    st.dictionaries(st.text(max_size=5), json_scalars, max_size=2),
)


def _ts(moment: datetime, style: int) -> str:
    text = format_ts(moment)
    if style == 1:
        return text.replace("Z", "+00:00")
    if style == 2:  # the same instant written with an offset
        return (moment + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M:%S+08:00")
    if style == 3:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return text


@st.composite
def records(draw):
    """A record, valid half of the time, else near any of its bounds."""
    valid = draw(st.booleans())
    now = utcnow().replace(microsecond=0)
    # Steer clear of the "5 minutes in the future" instant itself: the two
    # loads read the clock a moment apart.
    offsets = [-86400 * 40, -3600, -60, 0, 60, 240, 360, 3600]
    end_offset = draw(st.sampled_from(offsets[1:6] if valid else offsets))
    span = draw(
        st.integers(min_value=1, max_value=86400 * 31)
        if valid
        else st.sampled_from(
            [-60, 0, 1, 59, 3600, 86400 * 31, 86400 * 31 + 1, 86400 * 32]
        )
        | st.integers(min_value=-10, max_value=86400 * 32)
    )
    ended = now + timedelta(seconds=end_offset)
    started = ended - timedelta(seconds=span)
    counts = [0, 1, 2, 8, validation.MAX_GPU_COUNT, validation.MAX_GPU_COUNT + 1]
    count = draw(st.sampled_from(counts[1:5] if valid else counts))
    seconds_max = count * max(span, 0)
    seconds = draw(
        st.integers(min_value=0, max_value=max(seconds_max, 0))
        if valid
        else st.sampled_from([0, seconds_max, seconds_max + 1, -1])
    )

    def text(good, bad):
        return draw(st.sampled_from(good if valid else good + bad))

    return usage(
        record_id=draw(st.text(min_size=1, max_size=128 if valid else 129)),
        tenant_id=text(["t", "tenant-a", "x" * 128], ["x" * 129, ""]),
        voucher_code=text([None, voucher("SH"), "anything", ""], []),
        gpu_model=text(["H800", "B200", "x" * 64], ["x" * 65, ""]),
        gpu_count=count,
        gpu_seconds=seconds,
        started_at=_ts(started, draw(st.integers(0, 3))),
        ended_at=_ts(ended, draw(st.integers(0, 3))),
        source=text(["slurm", "x" * 32], ["x" * 33, ""]),
        job_id=text([None, "4242", ""], []),
        correction_of=text([None, "rec-1", "c" * 128], ["", "c" * 129]),
    )


@st.composite
def mutated(draw):
    record = draw(records())
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "set", "add"]))
        if action == "drop":
            record.pop(draw(st.sampled_from(FIELDS)), None)
        elif action == "set":
            record[draw(st.sampled_from(FIELDS))] = draw(json_values)
        else:
            record[draw(st.text(max_size=12))] = draw(json_values)
    # Only what a JSON body can hold (as parse_body hands it over).
    return json.loads(json.dumps(record))


@settings(max_examples=1500, deadline=None)
@given(records())
def test_fast_load_decides_as_the_schema_on_records_near_every_bound(record):
    assert_same_decision(record)


@settings(max_examples=1500, deadline=None)
@given(mutated())
@example(usage(started_at="0001-01-01T00:00:00+01:00"))
@example(usage(ended_at="9999-12-31T23:59:59-01:00"))
@example(usage(gpu_count=True))
@example(usage(gpu_seconds=7200.0))
@example(usage(voucher_code=42))
@example(usage(job_id=["x"]))
@example(usage(correction_of=None, colour="blue"))
def test_fast_load_decides_as_the_schema_on_mutated_records(record):
    assert_same_decision(record)


def test_a_well_formed_record_takes_the_fast_path():
    record = usage(voucher_code=voucher("SH"), correction_of="rec-0")
    loaded = validation.fast_load_usage(record)
    assert loaded is not None
    assert loaded == SCHEMA.load(record)
    assert loaded["started_at"].tzinfo is not None


def test_a_refused_record_is_worded_by_the_schema():
    record = usage(gpu_count="2")
    assert validation.fast_load_usage(record) is None
    try:
        validation.load_usage(record, DATACENTER_ID)
    except validation.Refused as refused:
        assert refused.reason == validation.Reason.SCHEMA
        assert refused.detail == {"gpu_count": ["Not a valid integer."]}
    else:  # pragma: no cover
        raise AssertionError("a string gpu_count was accepted")


def test_a_timestamp_out_of_range_is_schema_not_a_crash():
    record = usage(started_at="0001-01-01T00:00:00+01:00")
    try:
        validation.load_usage(record, DATACENTER_ID)
    except validation.Refused as refused:
        assert refused.reason == validation.Reason.SCHEMA
    else:  # pragma: no cover
        raise AssertionError("accepted")


def test_parse_body_skips_the_walk_only_when_no_escape_can_hide_a_nul():
    assert validation.parse_body(b'{"a": "b"}') == {"a": "b"}
    for body in (b'{"a": "\\u0000"}', b'{"\\u0000": 1}', b'{"a": ["\\ud800"]}'):
        try:
            validation.parse_body(body)
        except validation.Refused as refused:
            assert refused.reason == validation.Reason.SCHEMA
        else:  # pragma: no cover
            raise AssertionError(body)
