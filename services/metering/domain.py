"""Metering rules, pure Python: validate, rate and roll up usage (no I/O).

A message from a data centre is checked in this order, and the first rule it
breaks is the dead-letter reason it is stored under:

1. the envelope: body at most 64 KiB, ``content_type`` application/json
   (``schema``);
2. the routing key's data centre is registered (``unknown_datacenter``);
3. ``x-key-id`` is an active key of that data centre and ``x-signature`` is
   the HMAC of the exact body bytes (``bad_signature``);
4. the body is a JSON object that loads through the contract's schema
   (``schema``);
5. its ``datacenter_id`` is the routing key's (``datacenter_mismatch``);
6. its ``gpu_model`` is in the data centre's inventory (``unknown_gpu_model``);
7. its ``voucher_code``, when present, is well formed and names a known city
   (``unknown_voucher``);
8. a stored ``(datacenter_id, record_id)`` with another body
   (``conflicting_duplicate``; the same body is acknowledged and ignored).

A record may not correct itself (``correction_of == record_id``: ``schema``).

A usage record that passes is rated: ``cost_fen = round_half_up(gpu_seconds ×
price_fen_per_gpu_hour / 3600)`` (``services.common.units.rate_cost_fen``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from marshmallow import ValidationError

from services.common import contracts, signing, vouchercode
from services.common.units import format_ts, parse_ts, rate_cost_fen, utcnow

MAX_BODY_BYTES = 64 * 1024
JSON_CONTENT_TYPE = "application/json"
# Capacity reports come at least every 5 minutes; one report stands for at
# most this long, so a data centre that stops reporting stops counting.
CAPACITY_SLICE = timedelta(seconds=300)
# No single job uses a million GPUs; the bound keeps every product of the
# record's integers far inside a 64-bit column.
MAX_GPU_COUNT = 1_000_000

USAGE = "usage"
CAPACITY = "capacity"
# Built once: a marshmallow schema's construction costs more than a load.
_USAGE_SCHEMA = contracts.UsageRecordSchema()
_CAPACITY_SCHEMA = contracts.CapacityReportSchema()


class Reason:
    """Machine-readable dead-letter reasons (CONTRACTS.md §1)."""

    BAD_SIGNATURE = "bad_signature"
    SCHEMA = "schema"
    UNKNOWN_DATACENTER = "unknown_datacenter"
    DATACENTER_MISMATCH = "datacenter_mismatch"
    UNKNOWN_GPU_MODEL = "unknown_gpu_model"
    UNKNOWN_VOUCHER = "unknown_voucher"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"
    # Not a broken rule: processing failed (an exception) every time, even alone.
    PROCESSING_ERROR = "processing_error"


class Refused(Exception):
    """A message breaks a rule: it is stored as a dead letter, never applied."""

    def __init__(self, reason: str, detail: Any = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(reason, detail)

    @property
    def detail_text(self) -> str:
        if isinstance(self.detail, str):
            return self.detail
        return json.dumps(self.detail, sort_keys=True, default=str)


@dataclass(frozen=True)
class Rating:
    """What rating a record adds to it."""

    cost_fen: int
    unit_price_fen_per_gpu_hour: int
    datacenter: dict[str, Any] = field(default_factory=dict)


# -- the envelope -----------------------------------------------------------


def split_routing_key(routing_key: str) -> tuple[str, str]:
    """``"guian-gov-01.usage"`` → ``("guian-gov-01", "usage")``."""
    datacenter_id, _, kind = (routing_key or "").rpartition(".")
    return datacenter_id, kind


def check_envelope(body: bytes, content_type: str | None) -> None:
    if len(body) > MAX_BODY_BYTES:
        raise Refused(
            Reason.SCHEMA, f"body is {len(body)} bytes; at most {MAX_BODY_BYTES}"
        )
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != JSON_CONTENT_TYPE:
        raise Refused(
            Reason.SCHEMA, f"content_type {content_type!r} is not {JSON_CONTENT_TYPE}"
        )


def header_text(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def check_signature(
    body: bytes, headers: Mapping[str, Any], active_keys: Mapping[str, str]
) -> None:
    """The body must be signed with one of the data centre's active keys."""
    key_id = header_text(headers, signing.KEY_ID_HEADER)
    if not key_id:
        raise Refused(Reason.BAD_SIGNATURE, "no x-key-id header")
    secret = active_keys.get(key_id)
    if secret is None:
        raise Refused(
            Reason.BAD_SIGNATURE,
            f"key id {key_id[:128]!r} is not an active key of this data centre",
        )
    if not verify_signature(
        body, secret, header_text(headers, signing.SIGNATURE_HEADER)
    ):
        raise Refused(Reason.BAD_SIGNATURE, "signature does not match the body")


def verify_signature(body: bytes, secret: str, signature: str | None) -> bool:
    """``signing.verify``, decided the same way, without keying a new HMAC
    for every message: a data centre's secret is keyed once, then copied.
    ``test_verify_signature_is_signing_verify`` holds the two together.
    """
    if not signature or not isinstance(signature, str):
        return False
    if type(secret) is not str:  # pragma: no cover - the registry sends text
        return signing.verify(body, secret, signature)
    mac = _keyed_hmac(secret).copy()
    mac.update(body)
    return hmac.compare_digest(mac.hexdigest(), signature.lower())


@functools.lru_cache(maxsize=256)
def _keyed_hmac(secret: str) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with ``secret`` and fed nothing: copy, then use."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


# -- the body ----------------------------------------------------------------


def _storable(value: Any) -> bool:
    """True if every string in a parsed JSON value can go into a database.

    PostgreSQL text cannot hold NUL, and a lone surrogate (``"\\ud800"``) is
    not UTF-8; either would fail the insert on every redelivery.
    """
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


def parse_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or :class:`Refused` ``schema``."""
    try:
        text = body.decode("utf-8")
        data = _whole_object(text)
        if data is None:
            data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Refused(Reason.SCHEMA, f"body is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(data, dict):
        raise Refused(Reason.SCHEMA, "body is not a JSON object")
    # A NUL or a lone surrogate can only come from a \\u escape (json.loads
    # refuses raw control characters in strings; UTF-8 cannot carry a
    # surrogate), so a body without one needs no walk over its strings.
    if b"\\u" in body and not _storable(data):
        raise Refused(Reason.SCHEMA, "a string holds NUL or is not valid UTF-8")
    return data


def _whole_object(text: str) -> dict[str, Any] | None:
    """``json.loads(text)`` when ``text`` is one JSON object from its first
    character to its last (no whitespace around it), else None.

    ``json.loads`` runs the same scanner, after two regular-expression
    matches for the whitespace around it and the checks of its arguments:
    half its cost on a usage record. Anything else (whitespace, a BOM, an
    error) is None, and ``json.loads`` then decides, or words the error.
    ``test_whole_object_is_json_loads`` holds the two together.
    """
    if text[:1] != "{" or text[-1:] != "}":
        return None
    try:
        data, end = _scan_once(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return None
    return data if end == len(text) else None


# json.loads's own scanner (the default decoder's settings), called directly.
_scan_once = json.JSONDecoder().scan_once


def readable_record_id(body: bytes) -> str | None:
    """The ``record_id`` of a refused body, when it has one, for the listing."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    record_id = data.get("record_id") if isinstance(data, dict) else None
    if not isinstance(record_id, str) or not _storable(record_id):
        return None
    return record_id[:128]


def _check_datacenter(data: Mapping[str, Any], routing_datacenter_id: str) -> None:
    if data["datacenter_id"] != routing_datacenter_id:
        raise Refused(
            Reason.DATACENTER_MISMATCH,
            f"datacenter_id {data['datacenter_id']!r} but routing key names "
            f"{routing_datacenter_id!r}",
        )


def load_usage(data: Mapping[str, Any], routing_datacenter_id: str) -> dict[str, Any]:
    """Load a usage record through the contract (CONTRACTS.md §1).

    A well-formed record goes through :func:`fast_load_usage`, which accepts
    exactly what ``UsageRecordSchema`` accepts and loads it to the same dict;
    anything it does not accept goes through the schema, which then words
    the error (or, should the two ever disagree, has the last word).
    ``test_fast_load_decides_as_the_schema`` holds them together.
    """
    record = fast_load_usage(data)
    if record is None:
        record = _schema_load(_USAGE_SCHEMA, data)
    if record["gpu_count"] > MAX_GPU_COUNT:
        raise Refused(
            Reason.SCHEMA, {"gpu_count": [f"must be at most {MAX_GPU_COUNT}"]}
        )
    if record["correction_of"] is not None and (
        record["correction_of"] == record["record_id"]
    ):
        raise Refused(
            Reason.SCHEMA, {"correction_of": ["a record cannot correct itself"]}
        )
    _check_datacenter(record, routing_datacenter_id)
    return record


def _schema_load(schema, data: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise Refused(Reason.SCHEMA, exc.messages) from exc
    except OverflowError as exc:
        # parse_ts of e.g. "0001-01-01T00:00:00+01:00": before year 1 in UTC.
        raise Refused(Reason.SCHEMA, f"a timestamp is out of range: {exc}") from exc


# UsageRecordSchema's fields, as the fast path checks them.
_REQUIRED_TEXT = (
    ("record_id", 128),
    ("datacenter_id", 64),
    ("tenant_id", 128),
    ("gpu_model", 64),
    ("source", 32),
)
_OPTIONAL_TEXT = ("voucher_code", "job_id")


def fast_load_usage(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """``UsageRecordSchema().load(data)`` for a record that passes, else None.

    Hand-written, for the hot path: a marshmallow load costs more than every
    other check of a record together. It returns a dict only for a record the
    schema accepts, equal to what the schema returns; None means "ask the
    schema" (which then refuses, with its messages). Only JSON types are
    taken (``str``, ``int``, None); anything else is left to the schema.
    """
    try:
        if not _FIELD_NAMES.issuperset(data):
            return None  # an unknown field (Meta.unknown = RAISE)
        for name, longest in _REQUIRED_TEXT:
            value = data[name]
            if type(value) is not str or not 1 <= len(value) <= longest:
                return None
        for name in _OPTIONAL_TEXT:
            value = data.get(name)
            if value is not None and type(value) is not str:
                return None
        correction_of = data.get("correction_of")
        if correction_of is not None and (
            type(correction_of) is not str or not 1 <= len(correction_of) <= 128
        ):
            return None
        count, seconds = data["gpu_count"], data["gpu_seconds"]
        if type(count) is not int or count < 1:
            return None
        if type(seconds) is not int or seconds < 0:
            return None
        started, ended = data["started_at"], data["ended_at"]
        if type(started) is not str or type(ended) is not str:
            return None
        started, ended = _parse_time(started), _parse_time(ended)
        # UsageRecordSchema.check_times, the same comparisons in the same order
        if ended <= started or ended - started > contracts.MAX_SPAN:
            return None
        if ended > utcnow() + contracts.MAX_FUTURE_SKEW:
            return None
        if seconds > count * int((ended - started).total_seconds()):
            return None
    except Exception:  # noqa: BLE001 - whatever it is, the schema judges it
        return None
    return {
        "record_id": data["record_id"],
        "datacenter_id": data["datacenter_id"],
        "tenant_id": data["tenant_id"],
        "voucher_code": data.get("voucher_code"),
        "gpu_model": data["gpu_model"],
        "gpu_count": count,
        "started_at": started,
        "ended_at": ended,
        "gpu_seconds": seconds,
        "source": data["source"],
        "job_id": data.get("job_id"),
        "correction_of": correction_of,
    }


# The records of a job, a sampling window or a batch share their times: parsed
# once, they are also one object each, whose hash (for _wire_time's cache) is
# computed once. A datetime is immutable, so sharing it is safe.
_parse_time = functools.lru_cache(maxsize=4096)(parse_ts)


def load_capacity(
    data: Mapping[str, Any], routing_datacenter_id: str
) -> dict[str, Any]:
    """Load a capacity report through the contract (CONTRACTS.md §2)."""
    report = _schema_load(_CAPACITY_SCHEMA, data)
    if any(gpu["total"] > MAX_GPU_COUNT for gpu in report["gpus"]):
        raise Refused(Reason.SCHEMA, {"gpus": [f"total at most {MAX_GPU_COUNT}"]})
    _check_datacenter(report, routing_datacenter_id)
    return report


def inventory_item(datacenter: Mapping[str, Any], gpu_model: str) -> dict[str, Any]:
    """The data centre's inventory line for ``gpu_model``."""
    for item in datacenter.get("inventory") or ():
        if item.get("gpu_model") == gpu_model:
            return dict(item)
    raise Refused(
        Reason.UNKNOWN_GPU_MODEL,
        f"{gpu_model!r} is not in the inventory of {datacenter.get('id')!r}",
    )


def voucher_prefix(voucher_code: str) -> str:
    """The issuing city's prefix of a well-formed code, or ``unknown_voucher``."""
    try:
        return _parsed_voucher_prefix(voucher_code)
    except vouchercode.InvalidVoucherCode as exc:
        raise Refused(Reason.UNKNOWN_VOUCHER, str(exc)[:300]) from exc


# A tenant's records carry the same code again and again: its check character
# is computed once (only well-formed codes are kept; an error is not cached).
_parsed_voucher_prefix = functools.lru_cache(maxsize=65536)(vouchercode.parse)


def normalise_voucher_code(voucher_code: str) -> str:
    return voucher_code.strip().upper()


def unknown_prefix(prefix: str) -> Refused:
    return Refused(Reason.UNKNOWN_VOUCHER, f"no city issues vouchers {prefix}-…")


# -- rating and dedup ----------------------------------------------------------


def rate(record: Mapping[str, Any], datacenter: Mapping[str, Any]) -> Rating:
    """Price a validated record with its data centre's price for its GPU model."""
    price, government_run, hub_region, chip_origin = price_terms(
        datacenter, record["gpu_model"]
    )
    return Rating(
        cost_fen=rate_cost_fen(record["gpu_seconds"], price),
        unit_price_fen_per_gpu_hour=price,
        datacenter={
            "government_run": government_run,
            "hub_region": hub_region,
            "chip_origin": chip_origin,
        },
    )


PriceTerms = tuple[int, bool, str, str]


def price_terms(datacenter: Mapping[str, Any], gpu_model: str) -> PriceTerms:
    """What :func:`rate` takes from the data centre for ``gpu_model``:
    ``(price_fen_per_gpu_hour, government_run, hub_region, chip_origin)``;
    the same for every record of that model (the hot path asks once a batch).
    """
    item = inventory_item(datacenter, gpu_model)
    price = int(item["price_fen_per_gpu_hour"])
    return (
        price,
        bool(datacenter.get("government_run")),
        datacenter.get("hub_region") or "",
        item.get("chip_origin") or "imported",
    )


RECORD_FIELDS = tuple(contracts.UsageRecordSchema().fields)
_FIELD_NAMES = frozenset(RECORD_FIELDS)
_ZERO = timedelta(0)


# In key order: a dump is then already in its canonical order (record_json).
_SORTED_FIELDS = tuple(sorted(RECORD_FIELDS))


def dump_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``UsageRecordSchema().dump(record)``, without marshmallow (the hot path).

    Spelt out field by field, in key order (twice as fast as a loop over the
    fields); ``test_dump_record_equals_the_schema_dump`` keeps the two the
    same, and the check below that no field of the contract is missing.
    """
    get = record.get
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
    ``usage_rated`` body is made from (:func:`usage_rated_body`).

    ``contracts.canonical_json`` of the dump, byte for byte (a stored digest
    must keep matching): the dump's keys are in order already and its values
    flat, so one encoder built once serialises it without sorting
    (``json.dumps`` with options builds an encoder per call).
    """
    get = record.get
    count, seconds = get("gpu_count"), get("gpu_seconds")
    if type(count) is not int or type(seconds) is not int:
        return slow_record_json(record)  # bool, float, None: the encoder's way
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
        return slow_record_json(record)
    return text.encode()


def slow_record_json(record: Mapping[str, Any]) -> bytes:
    """:func:`record_json` through ``json``'s encoder: the reference, and
    the way for a value of any other type than ``str``, ``int`` or None."""
    return _PRESORTED_CANONICAL.encode(dump_record(record)).encode()


_PRESORTED_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
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


def usage_rated_event(
    record: Mapping[str, Any],
    city: str,
    rating: Rating,
    rated_at: datetime,
    dumped: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``<city>.usage_rated`` body; the same record always yields the same one.

    ``occurred_at`` is when the record was rated (stored), so a re-publish after
    a crash is byte-for-byte the first publish. ``dumped``: the record's
    :func:`dump_record`, when the caller has it already.
    """
    # Built by hand, not through ``contracts.make_event``: this runs once per
    # record on the hot path; ``test_usage_rated_event_matches_the_contract``
    # checks that both give the same body.
    event = {
        "event_id": usage_rated_event_id(record["datacenter_id"], record["record_id"]),
        "city": city,
        "occurred_at": _wire_time_of_batch(rated_at),
    }
    event.update(dump_record(record) if dumped is None else dumped)
    event["cost_fen"] = rating.cost_fen
    event["unit_price_fen_per_gpu_hour"] = rating.unit_price_fen_per_gpu_hour
    event["datacenter"] = {
        "government_run": bool(rating.datacenter["government_run"]),
        "hub_region": rating.datacenter["hub_region"],
        "chip_origin": rating.datacenter["chip_origin"],
    }
    return event


def usage_rated_body(
    record: Mapping[str, Any],
    city: str,
    rating: Rating,
    rated_at: datetime,
    record_json_: bytes | None = None,
) -> bytes:
    """:func:`usage_rated_event` as the JSON bytes to publish.

    The record's fields are spliced in from its canonical JSON (already made
    for its digest: ``record_json_``) rather than serialised a second time;
    the rest is a few fields. The same record always yields the same bytes.
    ``test_usage_rated_body_is_the_event`` checks it loads to the event.
    """
    if record_json_ is None:
        record_json_ = record_json(record)
    return usage_rated_bytes(
        usage_rated_event_id(record["datacenter_id"], record["record_id"]),
        city,
        rated_at,
        record_json_,
        rating.cost_fen,
        rating.unit_price_fen_per_gpu_hour,
        rating.datacenter["government_run"],
        rating.datacenter["hub_region"],
        rating.datacenter["chip_origin"],
    )


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
) -> bytes:
    """:func:`usage_rated_body` from its parts (no :class:`Rating` to build:
    the hot path has them as a stored row's columns, and the event id)."""
    return b"".join(
        (
            _event_head(city, _wire_time_of_batch(rated_at)),
            event_id.encode(),
            b'",',
            record_json_[1:-1],
            b',"cost_fen":%d,"unit_price_fen_per_gpu_hour":%d,"datacenter":'
            % (cost_fen, unit_price_fen_per_gpu_hour),
            _datacenter_json(bool(government_run), hub_region, chip_origin),
            b"}",
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


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour a record's span began in: its rollup bucket."""
    return moment.replace(minute=0, second=0, microsecond=0)


# -- capacity and utilisation --------------------------------------------------


def capacity_gpu_seconds(
    reports: Iterable[tuple[datetime, int]], start: datetime, end: datetime
) -> int:
    """GPU-seconds of capacity a data centre reported within ``[start, end)``.

    ``reports`` are ``(reported_at, total GPUs)`` in time order. Each report
    stands for its total GPUs from its ``reported_at`` until the next report,
    but for at most 300 s (reports are due every 5 minutes; a silent data
    centre stops counting); the last one stands until ``end`` ("now"), also at
    most 300 s. Only the part of each slice inside the window counts, so pass
    the reports from ``start − 300 s`` on. Linear in the number of reports.
    """
    total = 0
    reports = list(reports)
    for index, (reported_at, gpus) in enumerate(reports):
        following = reports[index + 1][0] if index + 1 < len(reports) else end
        until = min(following, reported_at + CAPACITY_SLICE, end)
        since = max(reported_at, start)
        if until > since:
            total += gpus * int((until - since).total_seconds())
    return total


def utilisation(used_gpu_seconds: int, capacity_gpu_seconds_: int) -> float | None:
    """Used ÷ capacity, capped at 1.0; None when no capacity was reported.

    Usage is bucketed by the hour its span started, capacity by the second, so
    the ratio can overshoot slightly at the edge of a window: it is capped.
    """
    if capacity_gpu_seconds_ <= 0:
        return None
    return min(1.0, used_gpu_seconds / capacity_gpu_seconds_)


# -- rollups: spreading over hours, corrections --------------------------------

HOUR = timedelta(hours=1)
_MICROSECOND = timedelta(microseconds=1)


def spread_over_hours(
    amount: int, started: datetime, ended: datetime
) -> list[tuple[datetime, int]]:
    """Split ``amount`` over the UTC hours ``[started, ended)`` covers, pro rata.

    Exact integers: the share of the hours up to a boundary is
    ``⌊amount × elapsed / span⌋``, and each hour gets the difference of two
    such cumulative shares, so the shares always sum to ``amount``, each is
    within one unit of its exact value, and the remainders fall where the
    cumulative rounding puts them (never all in one hour). ``amount`` may be
    negative (taking back a corrected record) and is split the same way.
    """
    hours, elapsed, span = _hours_of_span(started, ended, started.utcoffset())
    if elapsed is None:
        return [(hours[0], amount)]
    return list(zip(hours, _shares(amount, elapsed, span), strict=True))


@functools.lru_cache(maxsize=4096)
def _hours_of_span(
    started: datetime, ended: datetime, _offset: timedelta | None
) -> tuple[tuple[datetime, ...], tuple[int, ...] | None, int]:
    """The hours ``[started, ended)`` covers, and the microseconds from
    ``started`` to the end of each of them (None: all in one hour), and the
    span in microseconds. Cached: many records share a span (a job's GPUs,
    an agent's sampling window), and it is asked twice per record.

    ``_offset`` (``started.utcoffset()``) is part of the key only: the hours
    are cut in ``started``'s own zone, and two equal instants in different
    zones are equal keys otherwise."""
    span = (ended - started) // _MICROSECOND
    hour = hour_of(started)
    if span <= 0 or hour + HOUR >= ended:
        return (hour,), None, span
    hours = []
    elapsed = []
    while hour < ended:
        hours.append(hour)
        elapsed.append((min(hour + HOUR, ended) - started) // _MICROSECOND)
        hour += HOUR
    return tuple(hours), tuple(elapsed), span


def _shares(amount: int, elapsed: tuple[int, ...], span: int) -> list[int]:
    """Each hour's share of ``amount`` (see :func:`spread_over_hours`)."""
    negative = amount < 0
    amount = abs(amount)
    shares = []
    given = 0
    for upto in elapsed:
        cumulative = amount * upto // span
        shares.append(given - cumulative if negative else cumulative - given)
        given = cumulative
    return shares


RollupKey = tuple[str, str, str, str, str, datetime]


def rollup_contribution(
    row: Mapping[str, Any], sign: int = 1
) -> list[tuple[RollupKey, int, int, int]]:
    """What one stored record adds to the hourly rollups (``sign=-1`` removes it).

    ``[(bucket, records, gpu_seconds, cost_fen)]``: the record counts once, in
    the hour its span started; its GPU-seconds and its cost are spread over
    the hours of its span (:func:`spread_over_hours`).
    """
    started = _aware(row["started_at"])
    hours, elapsed, span = _hours_of_span(
        started, _aware(row["ended_at"]), started.utcoffset()
    )
    base = (
        row["datacenter_id"],
        row.get("city") or "",
        row["tenant_id"],
        row.get("voucher_code") or "",
        row["gpu_model"],
    )
    gpu_seconds, cost = sign * row["gpu_seconds"], sign * row["cost_fen"]
    if elapsed is None:
        return [((*base, hours[0]), sign, gpu_seconds, cost)]
    seconds = _shares(gpu_seconds, elapsed, span)
    costs = _shares(cost, elapsed, span)
    return [
        ((*base, hour), sign if n == 0 else 0, seconds[n], costs[n])
        for n, hour in enumerate(hours)
    ]


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


RecordKey = tuple[str, str]  # (datacenter_id, record_id)
_NO_KEYS: frozenset[RecordKey] = frozenset()


def effectiveness_changes(
    inserted: set[RecordKey],
    stored_targets: set[RecordKey],
    corrections: Iterable[tuple[RecordKey, RecordKey]],
) -> dict[RecordKey, int]:
    """Which records start (+1) or stop (−1) counting in the rollups.

    The rule: **a stored record counts in the rollups unless a stored record
    names it in ``correction_of``**. It depends only on the set of stored
    records, never on the order they arrived in, so late and out-of-order
    records, and a correction stored before its original, end as if in order.

    ``inserted`` are the records this transaction stored, ``stored_targets``
    the stored records that one of them corrects, ``corrections`` every
    stored ``(corrector, corrected)`` pair whose corrected record is in
    either set (including the ones just inserted).
    """
    correctors: dict[RecordKey, set[RecordKey]] = {}
    for corrector, corrected in corrections:
        correctors.setdefault(corrected, set()).add(corrector)
    changes = {}
    for key in inserted | stored_targets:
        by = correctors.get(key, _NO_KEYS)
        before = key not in inserted and not (by - inserted)
        after = not by
        if after != before:
            changes[key] = 1 if after else -1
    return changes


def lock_key(datacenter_id: str, record_id: str) -> int:
    """A signed 64-bit key for a PostgreSQL advisory lock on one record id.

    A record and its correction lock the same key, so two metering processes
    storing them at the same time are serialised and the second one sees the
    first (otherwise each could miss the other, and both would count).
    """
    digest = hashlib.blake2b(
        f"{datacenter_id}\x1f{record_id}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)
