"""Metering's rules for one message: which are broken, and why (no I/O).

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
6. its ``gpu_model`` is in the data centre's inventory (``unknown_gpu_model``,
   :mod:`.rating`);
7. its ``gpu_count`` is at most the data centre's registered count of that
   model (``exceeds_inventory``, :mod:`.rating`);
8. its ``voucher_code``, when present, is well formed and names a known city
   (``unknown_voucher``);
9. a stored ``(datacenter_id, record_id)`` with another body
   (``conflicting_duplicate``; the same body is acknowledged and ignored).
10. a correction of a record that another correction already corrected
    (``already_corrected``: the first correction stored wins,
    :func:`.rollups.competing_corrections`).

A record may not correct itself (``correction_of == record_id``: ``schema``).
Its ``gpu_uuids``, when present, are ``GPU-…``/``MIG-…`` names, none twice,
as many as ``gpu_count`` (``schema``; such a record takes the schema's path,
not :func:`fast_load_usage`'s). What passes every rule is stored, and may
still be *held* (``over_capacity``, ``double_claim``: :mod:`.holds`).
The rules that need the registry or the database are asked by
``services.metering.ingest``; this module decides them from the answers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError

from services.common import contracts, vouchercode
from services.common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, verify
from services.common.units import parse_ts, utcnow

MAX_BODY_BYTES = 64 * 1024
JSON_CONTENT_TYPE = "application/json"
# No single job uses a million GPUs; the bound keeps every product of the
# record's integers far inside a 64-bit column.
MAX_GPU_COUNT = 1_000_000

USAGE = "usage"
CAPACITY = "capacity"
# Built once: a marshmallow schema's construction costs more than a load.
_USAGE_SCHEMA = contracts.UsageRecordSchema()
_CAPACITY_SCHEMA = contracts.CapacityReportSchema()
# A usage record's fields (CONTRACTS.md §1), in the schema's order.
RECORD_FIELDS = tuple(_USAGE_SCHEMA.fields)
_FIELD_NAMES = frozenset(RECORD_FIELDS)


class Reason:
    """Machine-readable dead-letter reasons (CONTRACTS.md §1)."""

    BAD_SIGNATURE = "bad_signature"
    SCHEMA = "schema"
    UNKNOWN_DATACENTER = "unknown_datacenter"
    DATACENTER_MISMATCH = "datacenter_mismatch"
    # published by a broker user other than the data centre's own
    WRONG_PUBLISHER = "wrong_publisher"
    UNKNOWN_GPU_MODEL = "unknown_gpu_model"
    # more GPUs than the data centre registered of that model (DESIGN.md §9)
    EXCEEDS_INVENTORY = "exceeds_inventory"
    UNKNOWN_VOUCHER = "unknown_voucher"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"
    # a correction of a record another correction already corrected
    ALREADY_CORRECTED = "already_corrected"
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
    key_id = header_text(headers, KEY_ID_HEADER)
    if not key_id:
        raise Refused(Reason.BAD_SIGNATURE, "no x-key-id header")
    secret = active_keys.get(key_id)
    if secret is None:
        raise Refused(
            Reason.BAD_SIGNATURE,
            f"key id {key_id[:128]!r} is not an active key of this data centre",
        )
    if not verify(body, secret, header_text(headers, SIGNATURE_HEADER)):
        raise Refused(Reason.BAD_SIGNATURE, "signature does not match the body")


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
        if data.get("gpu_uuids") is not None:
            return None  # the GPUs a record names: the schema checks them
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
        "gpu_uuids": None,
    }


# The records of a job, a sampling window or a batch share their times: parsed
# once, they are also one object each, whose hash (for the cache of
# encoding._wire_time) is computed once. A datetime is immutable, so sharing
# it is safe.
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
