"""The wire contracts of CONTRACTS.md §1–3 as marshmallow schemas.

Every message that crosses a process boundary is loaded through one of these.
Consumers exclude unknown fields so that producers may extend a message
without breaking them ("extend, don't break"); producers dump with these same
schemas so that what they send is what the contract says.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    validate,
    validates_schema,
)

from services.common import creditcode, vouchercode
from services.common.units import format_ts, parse_ts, utcnow

MAX_SPAN = timedelta(days=31)
MAX_FUTURE_SKEW = timedelta(minutes=5)
SOURCES = ("slurm", "nvml", "dcgm", "kubernetes", "manual", "simulated")
FEDERATION_EVENTS = (
    "usage_rated",
    "program_published",
    "voucher_issued",
    "voucher_redeemed",
    "voucher_released",
    "heartbeat",
    "binding_requested",
    "binding_changed",
    # issue 15: holds, review and refusals (docs/ARCHITECTURE.md)
    "usage_hold",
    "usage_refused",
    "usage_held",
    "usage_released",
    "voucher_clawed_back",
)
# A GPU as nvidia-smi and DCGM print its UUID: ``GPU-<uuid>``, or a MIG
# instance ``MIG-<uuid>`` (or the older ``MIG-GPU-<uuid>/<gi>/<ci>``).
GPU_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]{0,118}$")
# Why metering holds a rated record (CONTRACTS §9: rated, not yet subsidised).
HOLD_REASONS = ("over_capacity", "double_claim")
# A review's verdict on a held record (``usage_released``).
RELEASE_DECISIONS = ("released", "refused")
# A stable namespace so that the same fact always gets the same event_id, and a
# redelivered or re-published fact is recognised downstream.
_EVENT_NAMESPACE = uuid.UUID("7f0b1a6e-4b7e-4c1e-9a43-2f5d0c9b8a11")


class CreditCode(fields.String):
    """A unified social credit code (``creditcode.py``), normalised; a wrong
    one fails with what is wrong (its check character, its length …)."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return creditcode.parse(text)
        except creditcode.InvalidCreditCode as exc:
            raise ValidationError(str(exc)) from None


class UtcTimestamp(fields.Field):
    """ISO 8601 UTC timestamp on the wire (``Z``), aware datetime in Python."""

    default_error_messages = {"invalid": "Not a UTC ISO 8601 timestamp."}

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        return (
            format_ts(value)
            if not isinstance(value, str)
            else format_ts(parse_ts(value))
        )

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return parse_ts(value)
        except (TypeError, ValueError) as exc:
            raise self.make_error("invalid") from exc


def _strict_int(**kwargs: Any) -> fields.Integer:
    return fields.Integer(strict=True, **kwargs)


class UsageRecordSchema(Schema):
    """CONTRACTS.md §1: one metered span of GPU use."""

    class Meta:
        unknown = RAISE

    record_id = fields.String(required=True, validate=validate.Length(1, 128))
    datacenter_id = fields.String(required=True, validate=validate.Length(1, 64))
    tenant_id = fields.String(required=True, validate=validate.Length(1, 128))
    voucher_code = fields.String(load_default=None, allow_none=True)
    gpu_model = fields.String(required=True, validate=validate.Length(1, 64))
    gpu_count = _strict_int(required=True, validate=validate.Range(min=1))
    started_at = UtcTimestamp(required=True)
    ended_at = UtcTimestamp(required=True)
    gpu_seconds = _strict_int(required=True, validate=validate.Range(min=0))
    source = fields.String(required=True, validate=validate.Length(1, 32))
    job_id = fields.String(load_default=None, allow_none=True)
    correction_of = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(1, 128)
    )
    # Extension (issue 15): the GPUs the job held. Optional: absent, the
    # record is what it always was, and its canonical JSON (and digest) too.
    gpu_uuids = fields.List(
        fields.String(validate=validate.Regexp(GPU_UUID)),
        load_default=None,
        allow_none=True,
    )

    @post_dump
    def omit_absent_gpu_uuids(self, data: dict, **kwargs: Any) -> dict:
        # A record without gpu_uuids dumps as before the field existed, so the
        # digest of every record stored before it stays the same.
        if data.get("gpu_uuids", ...) is None:
            del data["gpu_uuids"]
        return data

    @validates_schema
    def check_gpu_uuids(self, data: dict, **kwargs: Any) -> None:
        uuids, count = data.get("gpu_uuids"), data.get("gpu_count")
        if uuids is None:
            return
        if len(set(uuids)) != len(uuids):
            raise ValidationError("a GPU is named twice", "gpu_uuids")
        if count is not None and len(uuids) != count:
            raise ValidationError(
                f"names {len(uuids)} GPUs but gpu_count is {count}", "gpu_uuids"
            )

    @validates_schema
    def check_times(self, data: dict, **kwargs: Any) -> None:
        started, ended = data.get("started_at"), data.get("ended_at")
        if started is None or ended is None:
            return
        if ended <= started:
            raise ValidationError("ended_at must be after started_at", "ended_at")
        if ended - started > MAX_SPAN:
            raise ValidationError("span exceeds 31 days", "ended_at")
        if ended > utcnow() + MAX_FUTURE_SKEW:
            raise ValidationError(
                "ended_at is more than 5 minutes in the future", "ended_at"
            )
        count, seconds = data.get("gpu_count"), data.get("gpu_seconds")
        if count is not None and seconds is not None:
            span = int((ended - started).total_seconds())
            if seconds > count * span:
                raise ValidationError(
                    f"gpu_seconds {seconds} exceeds gpu_count × span = {count * span}",
                    "gpu_seconds",
                )


class AgentUsageRecordSchema(UsageRecordSchema):
    """What an agent POSTs to its data centre's gateway: no ``datacenter_id``."""

    datacenter_id = fields.String(load_default=None, allow_none=True)


class CapacityGpuSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(1, 64))
    total = _strict_int(required=True, validate=validate.Range(min=0))
    allocated = _strict_int(required=True, validate=validate.Range(min=0))

    @validates_schema
    def check_allocated(self, data: dict, **kwargs: Any) -> None:
        if data.get("allocated", 0) > data.get("total", 0):
            raise ValidationError("allocated exceeds total", "allocated")


class CapacityReportSchema(Schema):
    """CONTRACTS.md §2: how many GPUs a data centre has and how many are busy."""

    class Meta:
        unknown = RAISE

    datacenter_id = fields.String(required=True, validate=validate.Length(1, 64))
    reported_at = UtcTimestamp(required=True)
    gpus = fields.List(fields.Nested(CapacityGpuSchema), required=True)


class VoucherCode(fields.String):
    """A well-formed voucher code (CONTRACTS.md §4), normalised; a wrong one
    fails with what is wrong (its shape, its check character)."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            vouchercode.parse(text)
        except vouchercode.InvalidVoucherCode as exc:
            raise ValidationError(str(exc)[:300]) from None
        return text.strip().upper()


BINDING_ACTIONS = ("request", "cancel")


class BindingRequestSchema(Schema):
    """CONTRACTS.md §6: a data centre asks to bill a tenant's records to a
    voucher (``request``, its ``PUT …/voucher``) or stops (``cancel``,
    ``DELETE``); the voucher's holder decides (§7)."""

    class Meta:
        unknown = RAISE

    request_id = fields.String(required=True, validate=validate.Length(1, 128))
    datacenter_id = fields.String(required=True, validate=validate.Length(1, 64))
    tenant_id = fields.String(required=True, validate=validate.Length(1, 128))
    voucher_code = VoucherCode(required=True)
    action = fields.String(required=True, validate=validate.OneOf(BINDING_ACTIONS))
    requested_at = UtcTimestamp(required=True)

    @validates_schema
    def check_time(self, data: dict, **kwargs: Any) -> None:
        requested = data.get("requested_at")
        if requested is not None and requested > utcnow() + MAX_FUTURE_SKEW:
            raise ValidationError(
                "requested_at is more than 5 minutes in the future", "requested_at"
            )


# CONTRACTS.md §5: a city code. Every module that checks one uses these.
CITY_CODE_PATTERN = r"^[a-z0-9_]+$"
CITY_CODE = re.compile(CITY_CODE_PATTERN)


class FederationEventSchema(Schema):
    """CONTRACTS.md §3: every federation event carries these."""

    class Meta:
        unknown = EXCLUDE

    event_id = fields.String(required=True, validate=validate.Length(1, 128))
    city = fields.String(required=True, validate=validate.Regexp(CITY_CODE_PATTERN))
    occurred_at = UtcTimestamp(required=True)


class DatacenterAttributesSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    government_run = fields.Boolean(required=True)
    hub_region = fields.String(required=True)
    chip_origin = fields.String(
        required=True, validate=validate.OneOf(["domestic", "imported"])
    )
    # Extension: the data centre's recent utilisation 0..1, when metering has it.
    utilisation = fields.Float(
        load_default=None, allow_none=True, validate=validate.Range(min=0)
    )


class HoldSchema(Schema):
    """Why a rated record is held, and what shows it (the contract's evidence)."""

    class Meta:
        unknown = EXCLUDE

    reason = fields.String(required=True, validate=validate.OneOf(HOLD_REASONS))
    evidence = fields.Dict(load_default=dict)


class UsageRatedSchema(FederationEventSchema, UsageRecordSchema):
    """metering → city: a usage record with its cost."""

    class Meta:
        unknown = EXCLUDE

    cost_fen = _strict_int(required=True, validate=validate.Range(min=0))
    unit_price_fen_per_gpu_hour = _strict_int(
        required=True, validate=validate.Range(min=0)
    )
    datacenter = fields.Nested(DatacenterAttributesSchema, required=True)
    # Extensions (issue 15): rated but not to be subsidised until released;
    # re-sent by an operator's replay (the city decides its refusal again).
    hold = fields.Nested(HoldSchema, load_default=None, allow_none=True)
    replay = fields.Boolean(load_default=False)

    @validates_schema
    def check_times(self, data: dict, **kwargs: Any) -> None:
        # Rated usage was validated by metering on arrival; "not in the future"
        # must not be re-judged by a consumer whose clock reads it later.
        return


class ProgramSummarySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    id = fields.String(required=True)
    kind = fields.String(
        required=True, validate=validate.OneOf(["compute", "training_data"])
    )
    budget_fen = _strict_int(required=True, validate=validate.Range(min=1))
    rate_bp = _strict_int(required=True, validate=validate.Range(min=0, max=10_000))
    rules_version = fields.String(required=True)
    rules_sha256 = fields.String(required=True, validate=validate.Length(equal=64))
    # Extensions: the program's ledger state when it was published.
    available_fen = _strict_int(load_default=None, allow_none=True)
    committed_fen = _strict_int(load_default=None, allow_none=True)
    redeemed_fen = _strict_int(load_default=None, allow_none=True)
    # Extensions: the terms a national recommendation applies (issue 6);
    # bonuses as [{"when": {...}, "add_bp"}], datacenters as in the rules file.
    max_rate_bp = _strict_int(load_default=None, allow_none=True)
    bonuses = fields.List(fields.Dict(), load_default=None, allow_none=True)
    datacenters = fields.Raw(load_default=None, allow_none=True)


class ProgramPublishedSchema(FederationEventSchema):
    name = fields.String(load_default=None, allow_none=True)  # extension
    region = fields.String(load_default=None, allow_none=True)  # extension
    voucher_prefix = fields.String(load_default=None, allow_none=True)  # extension
    programs = fields.List(fields.Nested(ProgramSummarySchema), required=True)


class VoucherIssuedSchema(FederationEventSchema):
    voucher_code = fields.String(required=True)
    program_id = fields.String(required=True)
    face_value_fen = _strict_int(required=True, validate=validate.Range(min=1))
    expires_at = UtcTimestamp(required=True)


class VoucherRedeemedSchema(FederationEventSchema):
    voucher_code = fields.String(required=True)
    program_id = fields.String(load_default=None, allow_none=True)  # extension
    record_id = fields.String(required=True)
    datacenter_id = fields.String(required=True)
    gpu_seconds = _strict_int(required=True)
    cost_fen = _strict_int(required=True)
    # Negative for the reversal half of a correction.
    subsidy_fen = _strict_int(required=True)


class VoucherReleasedSchema(FederationEventSchema):
    voucher_code = fields.String(required=True)
    program_id = fields.String(load_default=None, allow_none=True)  # extension
    released_fen = _strict_int(required=True, validate=validate.Range(min=0))
    reason = fields.String(
        required=True, validate=validate.OneOf(["expired", "revoked"])
    )


class HeartbeatSchema(FederationEventSchema):
    version = fields.String(required=True)
    uptime_s = _strict_int(required=True, validate=validate.Range(min=0))


class BindingRequestedSchema(FederationEventSchema):
    """metering → city: a data centre asks to bill a tenant to a voucher
    (``request``) or takes the request back (``cancel``); only the holder
    authorises (CONTRACTS.md §7)."""

    voucher_code = fields.String(required=True, validate=validate.Length(1, 32))
    datacenter_id = fields.String(required=True, validate=validate.Length(1, 64))
    tenant_id = fields.String(required=True, validate=validate.Length(1, 128))
    action = fields.String(
        required=True, validate=validate.OneOf(["request", "cancel"])
    )
    requested_at = UtcTimestamp(required=True)


class BindingChangedSchema(FederationEventSchema):
    """city → registry: a binding's new status, and who changed it."""

    voucher_code = fields.String(required=True, validate=validate.Length(1, 32))
    company_id = fields.String(required=True)
    datacenter_id = fields.String(required=True, validate=validate.Length(1, 64))
    tenant_id = fields.String(required=True, validate=validate.Length(1, 128))
    status = fields.String(
        required=True, validate=validate.OneOf(["requested", "authorised", "withdrawn"])
    )
    actor = fields.String(required=True, validate=validate.Length(1, 128))
    changed_at = UtcTimestamp(required=True)


class _UsageFactSchema(FederationEventSchema):
    """What every event about one rated record of a city names."""

    record_id = fields.String(required=True, validate=validate.Length(1, 128))
    datacenter_id = fields.String(required=True, validate=validate.Length(1, 64))
    voucher_code = fields.String(load_default=None, allow_none=True)


class UsageHoldSchema(_UsageFactSchema):
    """metering → city: a record rated without hold, held after all."""

    hold = fields.Nested(HoldSchema, required=True)


class UsageRefusedSchema(_UsageFactSchema):
    """city → registry: a rated record the city did not book, and why."""

    reason = fields.String(required=True, validate=validate.Length(1, 64))
    detail = fields.String(load_default="", validate=validate.Length(max=512))


class UsageHeldSchema(_UsageFactSchema):
    """city → registry: a record held for review, with what it would book."""

    reason = fields.String(required=True, validate=validate.OneOf(HOLD_REASONS))
    subsidy_fen = _strict_int(required=True, validate=validate.Range(min=0))
    evidence = fields.Dict(load_default=dict)


class UsageReleasedSchema(_UsageFactSchema):
    """city → registry: a review's verdict on a held (or replayed) record."""

    decision = fields.String(required=True, validate=validate.OneOf(RELEASE_DECISIONS))
    subsidy_fen = _strict_int(required=True, validate=validate.Range(min=0))
    actor = fields.String(required=True, validate=validate.Length(1, 128))
    reason = fields.String(load_default="", validate=validate.Length(max=512))


class VoucherClawedBackSchema(FederationEventSchema):
    """city → registry: a booked subsidy reversed after review."""

    voucher_code = fields.String(required=True)
    record_id = fields.String(required=True, validate=validate.Length(1, 128))
    datacenter_id = fields.String(required=True, validate=validate.Length(1, 64))
    clawed_back_fen = _strict_int(required=True, validate=validate.Range(min=0))
    reason = fields.String(required=True, validate=validate.Length(1, 512))
    actor = fields.String(required=True, validate=validate.Length(1, 128))


EVENT_SCHEMAS: dict[str, type[FederationEventSchema]] = {
    "usage_rated": UsageRatedSchema,
    "program_published": ProgramPublishedSchema,
    "voucher_issued": VoucherIssuedSchema,
    "voucher_redeemed": VoucherRedeemedSchema,
    "voucher_released": VoucherReleasedSchema,
    "heartbeat": HeartbeatSchema,
    "binding_requested": BindingRequestedSchema,
    "binding_changed": BindingChangedSchema,
    "usage_hold": UsageHoldSchema,
    "usage_refused": UsageRefusedSchema,
    "usage_held": UsageHeldSchema,
    "usage_released": UsageReleasedSchema,
    "voucher_clawed_back": VoucherClawedBackSchema,
}


def event_id(*parts: str) -> str:
    """A deterministic event id: the same fact always yields the same id."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, "\x1f".join(parts)))


def make_event(event: str, city: str, eid: str, **fields_: Any) -> dict[str, Any]:
    """Build and validate a federation event body, ready to publish as JSON."""
    body = {"event_id": eid, "city": city, "occurred_at": utcnow(), **fields_}
    schema = EVENT_SCHEMAS[event]()
    dumped = schema.dump(body)
    errors = schema.validate(dumped)
    if errors:
        raise ValidationError(errors)
    return dumped


def load_event(event: str, body: dict[str, Any]) -> dict[str, Any]:
    """Load a received federation event; raises ValidationError."""
    return EVENT_SCHEMAS[event]().load(body)


def dump_record(record: dict[str, Any]) -> dict[str, Any]:
    return UsageRecordSchema().dump(record)


def canonical_json(obj: Any) -> bytes:
    """The byte form a producer signs and sends: compact, sorted keys, UTF-8."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


_RATED_TEXT = (  # required strings and their longest length
    ("event_id", 128),
    ("record_id", 128),
    ("datacenter_id", 64),
    ("tenant_id", 128),
    ("gpu_model", 64),
    ("source", 32),
)


def fast_load_usage_rated(body: Any) -> dict[str, Any] | None:
    """``UsageRatedSchema().load(body)`` for a body that passes, else None.

    The city books every rated record, and the schema's load costs more than
    the booking's Python: this hand-written path returns a dict only where the
    schema accepts, equal to what it returns (a hypothesis test says so);
    None means "ask the schema", which then accepts or words the refusal.
    Only exact JSON types are taken; anything else is left to the schema.
    """
    try:
        if type(body) is not dict:
            return None
        for name, longest in _RATED_TEXT:
            value = body[name]
            if type(value) is not str or not 1 <= len(value) <= longest:
                return None
        city = body["city"]
        if type(city) is not str or not CITY_CODE.match(city):
            return None
        optional = {}
        for name in ("voucher_code", "job_id", "correction_of"):
            value = body.get(name)
            if value is not None and type(value) is not str:
                return None
            optional[name] = value
        if optional["correction_of"] is not None and not (
            1 <= len(optional["correction_of"]) <= 128
        ):
            return None
        # A held record is rare: the schema loads its evidence; and the GPUs
        # a record names (a list of checked strings) too.
        if body.get("hold") is not None or body.get("gpu_uuids") is not None:
            return None
        replay = body.get("replay", False)
        if type(replay) is not bool:
            return None
        integers = {}
        for name, least in (
            ("gpu_count", 1),
            ("gpu_seconds", 0),
            ("cost_fen", 0),
            ("unit_price_fen_per_gpu_hour", 0),
        ):
            value = body[name]
            if type(value) is not int or value < least:
                return None
            integers[name] = value
        times = {}
        for name in ("occurred_at", "started_at", "ended_at"):
            value = body[name]
            if type(value) is not str:
                return None
            times[name] = parse_ts(value)
        dc = body["datacenter"]
        if type(dc) is not dict:
            return None
        government_run, hub_region = dc["government_run"], dc["hub_region"]
        chip_origin, utilisation = dc["chip_origin"], dc.get("utilisation")
        if type(government_run) is not bool or type(hub_region) is not str:
            return None
        if chip_origin not in ("domestic", "imported"):
            return None
        if utilisation is not None and (
            type(utilisation) not in (int, float)
            or utilisation != utilisation  # NaN
            or utilisation in (float("inf"),)
            or utilisation < 0
        ):
            return None
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return {
        "event_id": body["event_id"],
        "city": city,
        "occurred_at": times["occurred_at"],
        "record_id": body["record_id"],
        "datacenter_id": body["datacenter_id"],
        "tenant_id": body["tenant_id"],
        "voucher_code": optional["voucher_code"],
        "gpu_model": body["gpu_model"],
        "gpu_count": integers["gpu_count"],
        "started_at": times["started_at"],
        "ended_at": times["ended_at"],
        "gpu_seconds": integers["gpu_seconds"],
        "source": body["source"],
        "job_id": optional["job_id"],
        "correction_of": optional["correction_of"],
        "gpu_uuids": None,
        "cost_fen": integers["cost_fen"],
        "unit_price_fen_per_gpu_hour": integers["unit_price_fen_per_gpu_hour"],
        "datacenter": {
            "government_run": government_run,
            "hub_region": hub_region,
            "chip_origin": chip_origin,
            "utilisation": None if utilisation is None else float(utilisation),
        },
        "hold": None,
        "replay": replay,
    }
