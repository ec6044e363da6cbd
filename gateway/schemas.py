"""What enters and leaves the portal's API (CONTRACTS.md §7), as marshmallow 4.

Request schemas validate what a caller sends (unknown fields are an error, so a
mistyped optional field is reported rather than silently ignored). Response
schemas are what the public sees: a view dumps the service's answer through
one, so a field a service adds stays internal until it is added here. The
same classes feed the OpenAPI document (``gateway/openapi.py``).
"""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from services.common.contracts import UtcTimestamp

CITY_CODE_PATTERN = r"^[a-z0-9_]+$"  # CONTRACTS.md §5


def _fen(**kwargs) -> fields.Integer:
    return fields.Integer(metadata={"description": "money in integer fen"}, **kwargs)


# -- requests ---------------------------------------------------------------


class CompanySchema(Schema):
    class Meta:
        unknown = RAISE

    registration_id = fields.String(required=True, validate=validate.Length(1, 64))
    name = fields.String(required=True, validate=validate.Length(1, 200))
    registered_in = fields.String(
        required=True, validate=validate.Regexp(CITY_CODE_PATTERN)
    )
    employees = fields.Integer(strict=True, validate=validate.Range(min=0))
    annual_revenue_cny = fields.Integer(strict=True, validate=validate.Range(min=0))
    government_research_project = fields.Boolean()
    founded_on = fields.Date()
    sector = fields.String(validate=validate.Length(max=100))


class ApplicationRequestSchema(Schema):
    """``POST /api/v1/cities/<city>/applications``: a company asks for a voucher."""

    class Meta:
        unknown = RAISE

    program_id = fields.String(required=True, validate=validate.Length(1, 64))
    company = fields.Nested(CompanySchema, required=True)
    requested_face_value_cny = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=1)
    )


class DeadLetterQuerySchema(Schema):
    """Query string of ``GET /api/v1/dead-letters``."""

    class Meta:
        unknown = RAISE

    datacenter_id = fields.String(validate=validate.Length(1, 64))
    reason = fields.String(validate=validate.Length(1, 64))
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))


# -- responses --------------------------------------------------------------


class ErrorSchema(Schema):
    error = fields.String(metadata={"description": "machine-readable code"})
    message = fields.String()
    details = fields.Dict()


class HealthSchema(Schema):
    status = fields.String()


class ProgramStateSchema(Schema):
    id = fields.String()
    kind = fields.String(metadata={"description": "compute | training_data"})
    budget_fen = _fen()
    rate_bp = fields.Integer(metadata={"description": "basis points, 8000 = 80 %"})
    rules_version = fields.String(allow_none=True)
    rules_sha256 = fields.String(allow_none=True)
    available_fen = _fen()
    committed_fen = _fen()
    redeemed_fen = _fen()
    released_fen = _fen()


class CitySchema(Schema):
    code = fields.String()
    name = fields.String()
    region = fields.String(allow_none=True)
    voucher_prefix = fields.String(allow_none=True)
    status = fields.String(metadata={"description": "live | stale | unknown"})
    last_heartbeat_at = UtcTimestamp(allow_none=True)
    budget_fen = _fen()
    available_fen = _fen()
    committed_fen = _fen()
    redeemed_fen = _fen()
    released_fen = _fen()
    vouchers_issued = fields.Integer()
    programs = fields.List(fields.Nested(ProgramStateSchema))


class SummarySchema(Schema):
    cities = fields.Integer()
    live_cities = fields.Integer()
    datacenters = fields.Integer()
    budget_fen = _fen()
    committed_fen = _fen()
    redeemed_fen = _fen()
    gpu_seconds = fields.Integer()
    utilisation = fields.Float(
        allow_none=True, metadata={"description": "0..1 over the last 24 h"}
    )
    regions = fields.Dict(
        keys=fields.String(),
        values=fields.Dict(),
        metadata={"description": "the same figures per hub region"},
    )


class InventorySchema(Schema):
    gpu_model = fields.String()
    count = fields.Integer()
    chip_origin = fields.String(metadata={"description": "domestic | imported"})
    price_fen_per_gpu_hour = _fen()


class DatacenterSchema(Schema):
    id = fields.String()
    name = fields.String()
    operator = fields.String(allow_none=True)
    city = fields.String(allow_none=True)
    hub_region = fields.String(allow_none=True)
    government_run = fields.Boolean()
    inventory = fields.List(fields.Nested(InventorySchema))
    utilisation = fields.Float(allow_none=True)


class RedemptionSchema(Schema):
    record_id = fields.String()
    datacenter_id = fields.String()
    gpu_seconds = fields.Integer()
    cost_fen = _fen()
    subsidy_fen = _fen()


class VoucherSchema(Schema):
    code = fields.String()
    city = fields.String()
    program_id = fields.String()
    company_id = fields.String(metadata={"description": "the holder's registration id"})
    status = fields.String()
    face_value_fen = _fen()
    balance_fen = _fen()
    redeemed_fen = _fen()
    released_fen = _fen()
    issued_at = UtcTimestamp(allow_none=True)
    expires_at = UtcTimestamp(allow_none=True)
    redemptions = fields.List(fields.Nested(RedemptionSchema))


class ReasonSchema(Schema):
    rule = fields.String()
    passed = fields.Boolean()
    evidence = fields.Raw(allow_none=True)


class ApplicationResponseSchema(Schema):
    application_id = fields.String()
    decision = fields.String(
        metadata={"description": "approved | rejected | pending_review"}
    )
    reasons = fields.List(fields.Nested(ReasonSchema))
    rules_version = fields.String(allow_none=True)
    voucher = fields.Nested(VoucherSchema, allow_none=True)


class DeadLetterSchema(Schema):
    id = fields.Raw()
    datacenter_id = fields.String(allow_none=True)
    record_id = fields.String(allow_none=True)
    routing_key = fields.String(allow_none=True)
    reason = fields.String()
    detail = fields.Raw(allow_none=True)
    received_at = UtcTimestamp(allow_none=True)
