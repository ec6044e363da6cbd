"""The hot path's shortcuts give what the slow references they replace give.

- ``encoding.record_json`` (values written into a template) against the
  encoder (``reference.slow_record_json``) and ``canonical_json`` of the
  schema's dump;
- ``signing.verify`` (a secret keyed once, then copied) against a new HMAC
  keyed per call (``reference.one_shot_verify``);
- ``ingest.check`` (registry answers and prices asked once a batch, the row
  being the record) against the rules applied one by one as before;
- ``ingest.events_of`` (no ``Rating`` built) against
  ``reference.usage_rated_body``.
"""

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.common import contracts, signing
from services.common.amqp import RawMessage
from services.common.units import format_ts, utcnow
from services.metering import ingest
from services.metering.domain import encoding, validation
from services.metering.domain.validation import Refused
from services.metering.registry import CachedRegistry, RegistryCacheState
from tests.support import metering_reference as reference
from tests.support.metering_data import (
    DATACENTER_ID,
    SECRET,
    StandInRegistry,
    signed_headers,
    usage,
    voucher,
)

SCHEMA = contracts.UsageRecordSchema()


def outcome(function, *args):
    """What a call gives: ("ok", value) or ("raises", exception type, text)."""
    try:
        return ("ok", function(*args))
    except Exception as exc:  # noqa: BLE001 - compared, whatever it is
        return ("raises", type(exc), str(exc))


# -- record_json ----------------------------------------------------------------


class Text(str):
    """A str subclass: the encoder writes it as its text."""


class Count(int):
    """An int subclass: left to the encoder."""


texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(['"', "\\", "\x00", "\n", "\u2028", "é", "\ud800", "漢字"]),
    st.text(max_size=5).map(Text),
)
moments = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.none(),
    ),
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5))]
        ),
    ),
)
values = st.one_of(
    st.none(),
    texts,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.floats(allow_nan=False),
    st.integers(0, 10).map(Count),
    moments,
)


@st.composite
def dumpable_records(draw):
    """Loaded records, and records with any field of any type or missing."""
    record = validation.load_usage(
        usage(
            voucher_code=draw(st.sampled_from([None, voucher("SH")])),
            job_id=draw(st.none() | st.text(max_size=10)),
            tenant_id=draw(st.text(min_size=1, max_size=20)),
        ),
        DATACENTER_ID,
    )
    for name in draw(st.lists(st.sampled_from(validation.RECORD_FIELDS), max_size=4)):
        if name in ("started_at", "ended_at"):
            record[name] = draw(st.none() | moments)
        elif draw(st.booleans()):
            record.pop(name, None)
        else:
            record[name] = draw(values)
    return record


@settings(max_examples=1500, deadline=None)
@given(dumpable_records())
@example(validation.load_usage(usage(job_id='é"\n\u2028\x00'), DATACENTER_ID))
@example({**validation.load_usage(usage(), DATACENTER_ID), "gpu_count": True})
@example({**validation.load_usage(usage(), DATACENTER_ID), "record_id": "\ud800"})
@example({})
def test_record_json_is_the_encoders(record):
    assert outcome(encoding.record_json, record) == outcome(
        reference.slow_record_json, record
    )


@settings(max_examples=500, deadline=None)
@given(
    tenant=st.text(min_size=1, max_size=128),
    job_id=st.none() | st.text(max_size=20),
    record_id=st.text(min_size=1, max_size=128),
    voucher_code=st.sampled_from([None, voucher("SH"), voucher("CD")]),
    gpu_seconds=st.integers(0, 7200),
)
def test_record_json_of_a_loaded_record_is_the_schemas_dump(
    tenant, job_id, record_id, voucher_code, gpu_seconds
):
    record = validation.load_usage(
        usage(
            tenant_id=tenant,
            job_id=job_id,
            record_id=record_id,
            voucher_code=voucher_code,
            gpu_seconds=gpu_seconds,
        ),
        DATACENTER_ID,
    )
    wire = outcome(encoding.record_json, record)
    assert wire == outcome(reference.slow_record_json, record)
    assert wire == outcome(contracts.canonical_json, SCHEMA.dump(record))


# -- signatures -------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    body=st.binary(max_size=200),
    secret=st.text(max_size=20) | st.sampled_from([SECRET, "\ud800"]),
    how=st.sampled_from(["right", "upper", "wrong", "none", "empty", "other"]),
    other=st.one_of(st.text(max_size=70), st.binary(max_size=10), st.integers()),
)
def test_signing_verify_is_the_one_shot_hmac(body, secret, how, other):
    try:
        right = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    except UnicodeEncodeError:
        right = "0" * 64
    else:
        assert signing.sign(body, secret) == right
    signature = {
        "right": right,
        "upper": right.upper(),
        "wrong": right[:-1] + ("0" if right[-1] != "0" else "1"),
        "none": None,
        "empty": "",
        "other": other,
    }[how]
    assert outcome(signing.verify, body, secret, signature) == outcome(
        reference.one_shot_verify, body, secret, signature
    )


# -- check ---------------------------------------------------------------------


def reference_check(registry, message, index, rated_at):
    """``ingest.check`` as it was: every rule asked of the registry and
    ``domain`` one by one, the row a new dict."""
    datacenter_id, kind = validation.split_routing_key(message.routing_key)
    if kind not in (validation.USAGE, validation.CAPACITY):
        raise Refused(
            validation.Reason.SCHEMA,
            f"routing key {message.routing_key[:255]!r} is not metered",
        )
    user_id = message.properties.get("user_id")
    own = datacenter_id and user_id == f"dc.{datacenter_id}"
    if not (own or user_id in ("guest", "national.x")):
        raise Refused(
            validation.Reason.WRONG_PUBLISHER,
            f"{message.routing_key[:255]!r} published by broker user "
            f"{str(user_id)[:80]!r}, not by {datacenter_id[:64]!r}'s own",
        )
    validation.check_envelope(message.body, message.content_type)
    datacenter = registry.datacenter(datacenter_id) if datacenter_id else None
    if datacenter is None:
        raise Refused(
            validation.Reason.UNKNOWN_DATACENTER,
            f"{datacenter_id[:64]!r} is not registered",
        )
    key_id = validation.header_text(message.headers, signing.KEY_ID_HEADER)
    keys = registry.signing_keys(datacenter_id, key_id)
    key_id = validation.header_text(message.headers, signing.KEY_ID_HEADER)
    if not key_id:
        raise Refused(validation.Reason.BAD_SIGNATURE, "no x-key-id header")
    if keys.get(key_id) is None:
        raise Refused(
            validation.Reason.BAD_SIGNATURE,
            f"key id {key_id[:128]!r} is not an active key of this data centre",
        )
    signature = validation.header_text(message.headers, signing.SIGNATURE_HEADER)
    if not signing.verify(message.body, keys[key_id], signature):
        raise Refused(
            validation.Reason.BAD_SIGNATURE, "signature does not match the body"
        )
    data = validation.parse_body(message.body)
    if kind == validation.CAPACITY:
        report = validation.load_capacity(data, datacenter_id)
        return report, encoding.canonical_sha256(report, contracts.CapacityReportSchema)
    record = validation.load_usage(data, datacenter_id)
    rating = reference.rate(record, datacenter)
    registered = next(
        item.get("count") or 0
        for item in datacenter["inventory"]
        if item["gpu_model"] == record["gpu_model"]
    )
    if record["gpu_count"] > registered:
        raise Refused(
            validation.Reason.EXCEEDS_INVENTORY,
            f"gpu_count {record['gpu_count']} exceeds the {registered} "
            f"{record['gpu_model']!r} GPUs registered at {datacenter_id!r}",
        )
    city = None
    if record["voucher_code"] is not None:
        record["voucher_code"] = validation.normalise_voucher_code(
            record["voucher_code"]
        )
        prefix = validation.voucher_prefix(record["voucher_code"])
        city = registry.city_of_prefix(prefix)
        if city is None:
            raise validation.unknown_prefix(prefix)
    wire = reference.slow_record_json(record)
    digest = hashlib.sha256(wire).hexdigest()
    assert digest == encoding.canonical_sha256(record)
    row = {name: record[name] for name in validation.RECORD_FIELDS}
    row.update(
        record_sha256=digest,
        city=city,
        cost_fen=rating.cost_fen,
        unit_price_fen_per_gpu_hour=rating.unit_price_fen_per_gpu_hour,
        government_run=rating.datacenter["government_run"],
        hub_region=rating.datacenter["hub_region"],
        chip_origin=rating.datacenter["chip_origin"],
        rated_at=rated_at,
        hold=None,
    )
    if row["gpu_uuids"] is not None:  # stored as its canonical JSON array
        row["gpu_uuids"] = contracts.canonical_json(row["gpu_uuids"]).decode()
    return row, digest, wire, (datacenter_id, record["record_id"])


def judged(function, *args):
    try:
        return ("passed", function(*args))
    except Refused as refused:
        return ("refused", refused.reason, refused.detail_text)


@st.composite
def messages(draw):
    """A usage or capacity message, good or broken in one of many ways."""
    now = utcnow().replace(microsecond=0)
    record = usage(
        record_id=draw(st.sampled_from(["r1", "r2", "r3", "", "x" * 129])),
        voucher_code=draw(
            st.sampled_from(
                [None, voucher("SH"), voucher("CD"), " sh-abc ", "ZZ-1", "", 7]
            )
            | st.just(voucher("SH").lower())
            | st.just(voucher("ZZ"))
        ),
        gpu_model=draw(st.sampled_from(["H800", "Ascend-910B", "B200"])),
        gpu_seconds=draw(st.sampled_from([0, 1, 1799, 1800, 7200, 7201])),
        # H800: 256 registered, Ascend-910B: 512 (metering_data.DATACENTER)
        gpu_count=draw(st.sampled_from([1, 2, 2, 255, 256, 257, 512, 513])),
        datacenter_id=draw(st.sampled_from([DATACENTER_ID, "other-dc"])),
        correction_of=draw(st.sampled_from([None, "r1", "r0"])),
        started_at=format_ts(now - timedelta(hours=1)),
        ended_at=format_ts(now),
    )
    uuids = draw(st.sampled_from(["absent", None, "matching", "one", "bad", "twice"]))
    count = record["gpu_count"]
    if uuids != "absent":
        record["gpu_uuids"] = {
            None: None,
            "matching": [f"GPU-{n:04x}" for n in range(count)],
            "one": ["MIG-0a1b"],
            "bad": ["gpu-1"] + [f"GPU-{n}" for n in range(count - 1)],
            "twice": ["GPU-1"] * count,
        }[uuids]
    kind = draw(st.sampled_from(["usage", "usage", "usage", "capacity", "other"]))
    if kind == "capacity":
        record = {
            "datacenter_id": record["datacenter_id"],
            "reported_at": format_ts(now),
            "gpus": [{"model": "H800", "total": 10, "allocated": 3}],
        }
    body = contracts.canonical_json(record)
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.sampled_from([b"[]", b"{", b'{"a": "\\u0000"}', b"x" * 70000]))
    headers = signed_headers(body)
    spoil = draw(st.sampled_from(["", "", "", "key", "nokey", "signature", "bytes"]))
    if spoil == "key":
        headers["x-key-id"] = "unknown-key"
    elif spoil == "nokey":
        del headers["x-key-id"]
    elif spoil == "signature":
        headers["x-signature"] = headers["x-signature"][::-1]
    elif spoil == "bytes":
        headers = {name: value.encode() for name, value in headers.items()}
    routing_dc = draw(st.sampled_from([DATACENTER_ID, DATACENTER_ID, "unknown-dc", ""]))
    properties = {
        "content_type": draw(st.sampled_from(["application/json", "text/plain"]))
    }
    user_id = draw(
        st.sampled_from(
            [f"dc.{routing_dc}"] * 4
            + ["guest", "national.x", f"dc.{DATACENTER_ID}", "city.shanghai", None]
        )
    )
    if user_id is not None:
        properties["user_id"] = user_id
    return RawMessage(
        body=body,
        headers=headers,
        properties=properties,
        routing_key=f"{routing_dc}.{kind}",
        redelivered=False,
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=8))
def test_check_decides_and_rows_as_the_rules_one_by_one(batch):
    registry = CachedRegistry(RegistryCacheState(ttl_s=30), StandInRegistry())
    rated_at = datetime(2025, 3, 1, 12, tzinfo=UTC)
    lookups = ingest.Lookups(registry)  # shared by the batch, as process_batch does
    for index, message in enumerate(batch):
        fast = judged(ingest.check, lookups, message, index, rated_at)
        slow = judged(reference_check, registry, message, index, rated_at)
        assert fast[0] == slow[0], (fast, slow)
        if fast[0] == "refused":
            assert fast == slow
            continue
        checked = fast[1]
        assert checked.index == index
        if checked.kind == validation.CAPACITY:
            assert (checked.loaded, checked.digest) == slow[1]
            continue
        row, digest, wire, key = slow[1]
        assert checked.row == row
        assert (checked.digest, checked.wire, checked.key) == (digest, wire, key)
        assert checked.loaded["record_id"] == row["record_id"]
        assert checked.loaded["correction_of"] == row["correction_of"]


# -- events ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    tenant=st.text(min_size=1, max_size=20),
    city=st.sampled_from(["shanghai", "chengdu", None]),
    government_run=st.sampled_from([True, False, 1, 0]),
    hub_region=st.text(max_size=8),
    wire_known=st.booleans(),
)
def test_events_of_is_the_usage_rated_body(
    tenant, city, government_run, hub_region, wire_known
):
    record = validation.load_usage(
        usage(voucher_code=voucher("SH"), tenant_id=tenant), DATACENTER_ID
    )
    rated_at = datetime(2025, 3, 1, 12, tzinfo=UTC)
    rating = reference.Rating(
        cost_fen=1234,
        unit_price_fen_per_gpu_hour=1800,
        datacenter={
            "government_run": government_run,
            "hub_region": hub_region,
            "chip_origin": "domestic",
        },
    )
    row = {
        **record,
        "city": city,
        "cost_fen": rating.cost_fen,
        "unit_price_fen_per_gpu_hour": rating.unit_price_fen_per_gpu_hour,
        "government_run": government_run,
        "hub_region": hub_region,
        "chip_origin": "domestic",
        "rated_at": rated_at,
    }
    wire = encoding.record_json(record) if wire_known else None
    events = ingest.events_of(row, wire)
    if city is None:
        assert events == []
        return
    (event,) = events
    body = reference.usage_rated_body(record, city, rating, rated_at)
    assert event.body == body
    assert event.routing_key == f"{city}.usage_rated"
    assert event.event_id == contracts.event_id(
        "usage_rated", DATACENTER_ID, record["record_id"]
    )
    assert event.payload == reference.usage_rated_event(record, city, rating, rated_at)
    assert json.loads(body)["event_id"] == event.event_id


# -- parsing ---------------------------------------------------------------------

json_texts = st.one_of(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    ).map(json.dumps),
    st.text(max_size=30),
    st.sampled_from(
        ["{}", "{} ", " {}", "{}{}", '{"a":1}x', "\ufeff{}", "{", "}", '{"a":}'],
    ),
    st.sampled_from(['{"a":NaN}', '{"a":"\\ud800"}', '{"a":"\x01"}', "[" * 5000]),
)


@settings(max_examples=1000, deadline=None)
@given(json_texts)
@example("{" * 100000 + "}" * 100000)
def test_whole_object_is_json_loads(text):
    fast = validation._whole_object(text)
    slow = outcome(json.loads, text)
    if fast is not None:
        assert slow[0] == "ok"
        assert fast == slow[1] or json.dumps(fast) == json.dumps(slow[1])
        assert type(fast) is dict
    body = text.encode("utf-8", "surrogatepass")
    assert judged(validation.parse_body, body) == judged(reference_parse_body, body)


def reference_parse_body(body):
    """``validation.parse_body`` as it was: ``json.loads`` of the decoded body."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise Refused(
            validation.Reason.SCHEMA, f"body is not JSON: {str(exc)[:200]}"
        ) from exc
    if not isinstance(data, dict):
        raise Refused(validation.Reason.SCHEMA, "body is not a JSON object")
    if b"\\u" in body and not validation._storable(data):
        raise Refused(
            validation.Reason.SCHEMA, "a string holds NUL or is not valid UTF-8"
        )
    return data
