"""What the dead-letter, review-queue and clawback endpoints take and return
(``gateway/review_api.py``)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from gateway.schemas import DeadLetterQuerySchema, PageQuerySchema
from services.common.contracts import CITY_CODE_PATTERN, UtcTimestamp

HELD_STATUSES = ("held", "released", "refused", "all")


class DeadLettersQuerySchema(DeadLetterQuerySchema):
    """Query string of ``GET /api/v1/dead-letters``: ``source`` is
    ``metering`` or a city's code (default: both)."""

    source = fields.String(
        validate=validate.Regexp(CITY_CODE_PATTERN),
        metadata={"description": "metering, or a city code"},
    )


class MergedDeadLetterSchema(Schema):
    """A dead letter of metering (``id`` an integer) or a city's refusal
    (``id`` ``city:<n>``), replayed at ``replay_url``."""

    id = fields.Raw(metadata={"description": "an integer, or city:<n>"})
    source = fields.String(metadata={"description": "metering, or the city"})
    datacenter_id = fields.String(allow_none=True)
    record_id = fields.String(allow_none=True)
    voucher_code = fields.String(allow_none=True, dump_default=None)
    routing_key = fields.String(allow_none=True)
    reason = fields.String()
    detail = fields.Raw(allow_none=True)
    received_at = UtcTimestamp(allow_none=True)
    replayed_at = UtcTimestamp(allow_none=True, dump_default=None)
    replay_outcome = fields.String(allow_none=True, dump_default=None)
    replay_reason = fields.String(allow_none=True, dump_default=None)
    replay_url = fields.String()


class RefusalReplaySchema(Schema):
    outcome = fields.String(metadata={"description": "replayed"})
    reason = fields.String(allow_none=True)
    event_id = fields.String(allow_none=True)
    dead_letter = fields.Nested(MergedDeadLetterSchema)


class HeldQuerySchema(PageQuerySchema):
    status = fields.String(load_default="held", validate=validate.OneOf(HELD_STATUSES))


class HeldUsageSchema(Schema):
    """A held record: what it claimed, why it is held, what it would book."""

    datacenter_id = fields.String()
    record_id = fields.String()
    voucher_code = fields.String(allow_none=True)
    program_id = fields.String(allow_none=True)
    reason = fields.String(metadata={"description": "over_capacity | double_claim"})
    evidence = fields.Dict()
    retroactive = fields.Boolean(
        metadata={"description": "held after it was booked (its booking reversed)"}
    )
    tenant_id = fields.String(allow_none=True)
    gpu_model = fields.String(allow_none=True)
    started_at = fields.String(allow_none=True)
    ended_at = fields.String(allow_none=True)
    gpu_seconds = fields.Integer()
    cost_fen = fields.Integer()
    subsidy_fen = fields.Integer(metadata={"description": "what it would book"})
    status = fields.String(metadata={"description": "held | released | refused"})
    held_at = fields.String()
    decided_at = fields.String(allow_none=True)
    decided_by = fields.String(allow_none=True)
    decision_reason = fields.String(allow_none=True)


class DecisionRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    decision = fields.String(
        required=True, validate=validate.OneOf(("release", "refuse"))
    )
    reason = fields.String(required=True, validate=validate.Length(1, 512))


class ClawbackRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    datacenter_id = fields.String(required=True, validate=validate.Length(1, 64))
    record_id = fields.String(required=True, validate=validate.Length(1, 128))
    reason = fields.String(required=True, validate=validate.Length(1, 512))


class ClawbackSchema(Schema):
    datacenter_id = fields.String()
    record_id = fields.String()
    voucher_code = fields.String()
    clawed_back_fen = fields.Integer()
    status = fields.String()
    actor = fields.String()
    reason = fields.String()
