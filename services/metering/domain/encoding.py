"""The wire form of a usage record: its canonical JSON, digest and event (no I/O).

A record's digest is the sha256 of the canonical JSON of its schema dump
(``contracts.canonical_json``): two bodies that load to the same record have
the same digest. Its ``<city>.usage_rated`` event is that JSON with what
rating adds (CONTRACTS.md §3). Everything here runs once per record on
metering's hot path, so the encodings are written out by hand; the
references they must equal byte for byte (the schema's dump, ``json``'s
encoder, ``contracts.make_event``) are in ``tests/support/metering_reference.py``
and the tests in ``tests/unit/metering`` hold the two together.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common import contracts
from services.common.units import format_ts
from services.metering.domain.validation import RECORD_FIELDS

_ZERO = timedelta(0)


# In key order: a dump is then already in its canonical order (record_json).
# ``gpu_uuids`` (issue 15) is in a dump only when the record names GPUs, so a
# record without them keeps the canonical JSON (and digest) it always had.
_OPTIONAL_FIELDS = frozenset({"gpu_uuids"})
_SORTED_FIELDS = tuple(sorted(set(RECORD_FIELDS) - _OPTIONAL_FIELDS))


def dump_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``UsageRecordSchema().dump(record)``, without marshmallow (the hot path).

    Spelt out field by field, in key order (twice as fast as a loop over the
    fields); ``test_dump_record_equals_the_schema_dump`` keeps the two the
    same, and the check below that no field of the contract is missing.
    """
    get = record.get
    uuids = get("gpu_uuids")
    if uuids is not None:  # rare: the key's place in the order, by the sort
        dumped = _dump_fields(get)
        dumped["gpu_uuids"] = list(uuids)
        return dict(sorted(dumped.items()))
    return _dump_fields(get)


def _dump_fields(get) -> dict[str, Any]:
    return {
        "correction_of": get("correction_of"),
        "datacenter_id": get("datacenter_id"),
        "ended_at": _wire_time(get("ended_at")),
        "gpu_count": get("gpu_count"),
        "gpu_model": get("gpu_model"),
        "gpu_seconds": get("gpu_seconds"),
        "job_id": get("job_id"),
        "record_id": get("record_id"),
        "source": get("source"),
        "started_at": _wire_time(get("started_at")),
        "tenant_id": get("tenant_id"),
        "voucher_code": get("voucher_code"),
    }


def _wire_time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return _wire_time_cached(moment)


# Records of one job, one sampling window or one batch share their times.
@functools.lru_cache(maxsize=4096)
def _wire_time_cached(moment: datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() == _ZERO:
        # format_ts's output, without strftime (a hot spot in the profile)
        if moment.year >= 1000:
            return moment.replace(microsecond=0, tzinfo=None).isoformat() + "Z"
        moment = moment.replace(tzinfo=UTC)
    return format_ts(moment)


@functools.lru_cache(maxsize=16)
def _wire_time_of_batch(moment: datetime) -> str | None:
    """:func:`_wire_time` of a time shared by a whole batch (its rating time)."""
    return _wire_time(moment)


if tuple(dump_record({})) != _SORTED_FIELDS:  # pragma: no cover - a new field
    raise RuntimeError("dump_record does not spell out UsageRecordSchema's fields")


def canonical_sha256(message: Mapping[str, Any], schema_cls=None) -> str:
    """sha256 of the canonical form of a loaded message.

    Two bodies that load to the same record (key order, spacing, ``+00:00``
    versus ``Z``) have the same digest; any difference in a field changes it.
    """
    if schema_cls is None or schema_cls is contracts.UsageRecordSchema:
        dumped = dump_record(message)
    else:
        dumped = schema_cls().dump(message)
    return wire_sha256(dumped)


def wire_sha256(dumped: Mapping[str, Any]) -> str:
    """:func:`canonical_sha256` of a record already dumped (:func:`dump_record`)."""
    return hashlib.sha256(contracts.canonical_json(dumped)).hexdigest()


def record_json(record: Mapping[str, Any]) -> bytes:
    """A loaded record's canonical JSON: what its digest is taken of
    (``sha256(record_json(r)) == canonical_sha256(r)``), and what its
    ``usage_rated`` body is made from (:func:`usage_rated_bytes`).

    ``contracts.canonical_json`` of the dump, byte for byte (a stored digest
    must keep matching): the dump's keys are in order already and its values
    flat, so they are written into a template built once (``json.dumps``
    builds an encoder per call, and sorts).
    """
    get = record.get
    count, seconds = get("gpu_count"), get("gpu_seconds")
    if type(count) is not int or type(seconds) is not int:
        return _encoded_record_json(record)  # bool, float, None: the encoder's way
    if get("gpu_uuids") is not None:
        return _encoded_record_json(record)  # GPUs named: the encoder's way
    correction_of, job_id = get("correction_of"), get("job_id")
    voucher_code = get("voucher_code")
    quote = _quote
    try:
        text = _RECORD_JSON % (
            "null" if correction_of is None else quote(correction_of),
            quote(get("datacenter_id")),
            quote(_wire_time(get("ended_at"))),
            count,
            quote(get("gpu_model")),
            seconds,
            "null" if job_id is None else quote(job_id),
            quote(get("record_id")),
            quote(get("source")),
            quote(_wire_time(get("started_at"))),
            quote(get("tenant_id")),
            "null" if voucher_code is None else quote(voucher_code),
        )
    except TypeError:  # not text (None included where text is due)
        return _encoded_record_json(record)
    return text.encode()


def _encoded_record_json(record: Mapping[str, Any]) -> bytes:
    """:func:`record_json` by ``json``'s encoder: the way for a value of any
    other type than ``str``, ``int`` or None (never a loaded record's)."""
    return contracts.canonical_json(dump_record(record))


# The dump's keys in order, each followed by its value as the encoder writes
# it (a str quoted by the encoder's own function, an int as %d, None as null),
# without building an encoder per record (JSONEncoder.encode does).
# ``test_record_json_is_the_encoders`` holds the two together.
_INT_FIELDS = frozenset({"gpu_count", "gpu_seconds"})
_RECORD_JSON = (
    "{"
    + ",".join(
        f'"{name}":%d' if name in _INT_FIELDS else f'"{name}":%s'
        for name in _SORTED_FIELDS
    )
    + "}"
)
# What JSONEncoder(ensure_ascii=False) writes a str with (C when available).
_quote = json.encoder.encode_basestring


_EVENT_ID_PREFIX = contracts._EVENT_NAMESPACE.bytes + b"usage_rated\x1f"


def usage_rated_event_id(datacenter_id: str, record_id: str) -> str:
    """``contracts.event_id("usage_rated", datacenter_id, record_id)``, without
    building ``uuid.UUID`` objects (once per record on the hot path).

    A uuid5 by RFC 4122: SHA-1 of namespace and name, version and variant
    bits set. ``test_usage_rated_event_id_is_the_contracts_uuid5`` checks it.
    """
    digest = bytearray(
        hashlib.sha1(
            _EVENT_ID_PREFIX + f"{datacenter_id}\x1f{record_id}".encode()
        ).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    x = digest.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def usage_rated_bytes(
    event_id: str,
    city: str,
    rated_at: datetime,
    record_json_: bytes,
    cost_fen: int,
    unit_price_fen_per_gpu_hour: int,
    government_run: Any,
    hub_region: str,
    chip_origin: str,
    hold: bytes | None = None,
) -> bytes:
    """The ``<city>.usage_rated`` body (CONTRACTS.md §3) as the JSON to publish.

    The record's fields are spliced in from its canonical JSON (already made
    for its digest: ``record_json_``) rather than serialised a second time;
    the rest is a few fields, which the hot path has as a stored row's
    columns. ``occurred_at`` is ``rated_at``, when the record was stored, so
    the same record always yields the same bytes and a re-publish after a
    crash is the first publish. ``test_usage_rated_body_is_the_event`` checks
    it loads to the event ``contracts.make_event`` builds.

    ``hold``: the canonical JSON of the record's hold (``HoldSchema``), when
    it is held as it is rated (``domain.holds``); absent otherwise.
    """
    return b"".join(
        (
            _event_head(city, _wire_time_of_batch(rated_at)),
            event_id.encode(),
            b'",',
            record_json_[1:-1],
            b',"cost_fen":%d,"unit_price_fen_per_gpu_hour":%d,"datacenter":'
            % (cost_fen, unit_price_fen_per_gpu_hour),
            _datacenter_json(bool(government_run), hub_region, chip_origin),
            b"}" if hold is None else b',"hold":' + hold + b"}",
        )
    )


@functools.lru_cache(maxsize=256)
def _event_head(city: str, occurred_at: str) -> bytes:
    return b'{"city":%s,"occurred_at":%s,"event_id":"' % (
        contracts.canonical_json(city),
        contracts.canonical_json(occurred_at),
    )


@functools.lru_cache(maxsize=256)
def _datacenter_json(government_run: bool, hub_region: str, chip_origin: str) -> bytes:
    return contracts.canonical_json(
        {
            "government_run": government_run,
            "hub_region": hub_region,
            "chip_origin": chip_origin,
        }
    )
