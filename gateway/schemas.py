"""What enters and leaves the portal's API (CONTRACTS.md §7), as marshmallow 4.

Request schemas validate what a caller sends (unknown fields are an error, so a
mistyped optional field is reported rather than silently ignored). Response
schemas are what the public sees: a view dumps the service's answer through
one, so a field a service adds stays internal until it is added here. The
same classes feed the OpenAPI document (``gateway/openapi.py``).
"""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from services.common.contracts import CITY_CODE_PATTERN, CreditCode, UtcTimestamp
from services.vouchers import schemas as vouchers_schemas

APPLICATION_STATUSES = ("approved", "rejected", "pending_review")
VOUCHER_STATUSES = ("active", "exhausted", "expired", "revoked")


def _fen(**kwargs) -> fields.Integer:
    return fields.Integer(metadata={"description": "money in integer fen"}, **kwargs)


# -- requests ---------------------------------------------------------------

FORMATS = ("json", "csv")
MAX_LIMIT = 1000


def _format_field() -> fields.String:
    return fields.String(
        load_default=None,
        validate=validate.OneOf(FORMATS),
        metadata={"description": "csv for a spreadsheet (or Accept: text/csv)"},
    )


class FormatQuerySchema(Schema):
    """``format`` alone, for small collections that are not paginated."""

    class Meta:
        unknown = RAISE

    format = _format_field()


class PageQuerySchema(FormatQuerySchema):
    """``limit``, ``offset`` and ``format``, shared by every collection's query."""

    limit = fields.Integer(load_default=100, validate=validate.Range(1, MAX_LIMIT))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0))


class CompanySchema(Schema):
    class Meta:
        unknown = RAISE

    # the unified social credit code: refused by its check character
    registration_id = CreditCode(required=True)
    name = fields.String(required=True, validate=validate.Length(1, 200))
    registered_in = fields.String(
        required=True, validate=validate.Regexp(CITY_CODE_PATTERN)
    )
    employees = fields.Integer(strict=True, validate=validate.Range(min=0))
    annual_revenue_cny = fields.Integer(strict=True, validate=validate.Range(min=0))
    government_research_project = fields.Boolean()
    founded_on = fields.Date()
    sector = fields.String(validate=validate.Length(max=100))


class ApplicationRequestSchema(vouchers_schemas.ApplicationRequestSchema):
    """``POST /api/v1/cities/<city>/applications``: a company asks for a voucher.

    The city's own request body, with the portal's stricter company (a city
    code for ``registered_in``) checked before the request leaves the portal.
    """

    company = fields.Nested(CompanySchema, required=True)


class ReviewRequestSchema(Schema):
    """``POST …/applications/<id>/review``: city staff decide a pending one."""

    class Meta:
        unknown = RAISE

    approve = fields.Boolean(required=True)
    reason = fields.String(required=True, validate=validate.Length(1, 500))


class RevokeRequestSchema(Schema):
    """``POST /api/v1/vouchers/<code>/revoke``: the balance goes back."""

    class Meta:
        unknown = RAISE

    reason = fields.String(required=True, validate=validate.Length(1, 500))


class DeadLetterQuerySchema(PageQuerySchema):
    """Query string of ``GET /api/v1/dead-letters``."""

    datacenter_id = fields.String(validate=validate.Length(1, 64))
    reason = fields.String(validate=validate.Length(1, 64))


class ApplicationQuerySchema(PageQuerySchema):
    """Query string of ``GET /api/v1/cities/<city>/applications``."""

    status = fields.String(validate=validate.OneOf(APPLICATION_STATUSES))


class VoucherQuerySchema(PageQuerySchema):
    """Query string of ``GET /api/v1/cities/<city>/vouchers``."""

    company_id = fields.String(validate=validate.Length(1, 64))
    status = fields.String(validate=validate.Length(1, 16))


class UsageQuerySchema(FormatQuerySchema):
    """Query string of a data centre's usage reports."""

    window_hours = fields.Integer(load_default=24, validate=validate.Range(1, 24 * 31))


class AuditQuerySchema(PageQuerySchema):
    """Query string of ``GET /api/v1/audit``."""

    actor = fields.String(validate=validate.Length(1, 200))
    action = fields.String(validate=validate.Length(1, 100))
    scope = fields.String(validate=validate.Length(1, 64))


class TokenQuerySchema(PageQuerySchema):
    """Query string of ``GET /api/v1/tokens``."""

    role = fields.String(
        validate=validate.Length(1, 300),
        metadata={"description": "only tokens of this role (national admin)"},
    )


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


REDEMPTION_STATUSES = ("booked", "clawed_back", "refused")


class RedemptionLineSchema(Schema):
    """One line of ``GET /vouchers/<code>/redemptions``: a booked record, the
    reversal of one a correction superseded (``clawed_back``), or a record
    refused against the voucher (no GPU-seconds or money: nothing booked)."""

    record_id = fields.String()
    datacenter_id = fields.String()
    tenant_id = fields.String(
        allow_none=True,
        metadata={
            "description": "null on refused and held lines, and on "
            "lines booked before the ledger kept it (migration 0008)"
        },
    )
    started_at = UtcTimestamp(
        allow_none=True,
        metadata={
            "description": "null on refused and held lines, and on "
            "lines booked before the ledger kept it (migration 0008)"
        },
    )
    ended_at = UtcTimestamp(
        allow_none=True,
        metadata={
            "description": "null on refused and held lines, and on "
            "lines booked before the ledger kept it (migration 0008)"
        },
    )
    gpu_seconds = fields.Integer(allow_none=True)
    cost_fen = _fen(allow_none=True)
    subsidy_fen = _fen(allow_none=True)
    status = fields.String(
        validate=validate.OneOf(REDEMPTION_STATUSES),
        metadata={"description": " | ".join(REDEMPTION_STATUSES)},
    )
    booked_at = UtcTimestamp(
        allow_none=True, metadata={"description": "booked (or refused) at"}
    )
    reason = fields.String(
        allow_none=True, metadata={"description": "why it was refused"}
    )


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
    redemptions_total = fields.Integer(
        metadata={
            "description": "how many lines there are; the list holds the latest "
            "100, /redemptions pages through them all"
        }
    )


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
    company_token = fields.String(
        metadata={
            "description": "the company's portal token, present once: in the "
            "answer that issued its first voucher while it had no live token"
        }
    )


class DeadLetterSchema(Schema):
    id = fields.Raw()
    datacenter_id = fields.String(allow_none=True)
    record_id = fields.String(allow_none=True)
    routing_key = fields.String(allow_none=True)
    reason = fields.String()
    detail = fields.Raw(allow_none=True)
    received_at = UtcTimestamp(allow_none=True)


class ApplicationSchema(Schema):
    """One application as city staff see it in their list and review queue."""

    application_id = fields.String()
    program_id = fields.String()
    company_id = fields.String(metadata={"description": "registration id"})
    company = fields.Dict(metadata={"description": "what the company declared"})
    requested_face_value_fen = _fen()
    decision = fields.String(
        metadata={"description": "approved | rejected | pending_review"}
    )
    reasons = fields.List(fields.Nested(ReasonSchema))
    rules_version = fields.String(allow_none=True)
    rules_sha256 = fields.String(allow_none=True)
    voucher_code = fields.String(allow_none=True)
    voucher = fields.Nested(VoucherSchema, allow_none=True)
    decided_at = UtcTimestamp(allow_none=True)
    reviewed_by = fields.String(allow_none=True)
    reviewed_at = UtcTimestamp(allow_none=True)
    review_reason = fields.String(allow_none=True)
    company_token = fields.String(
        metadata={
            "description": "the company's portal token, present once: in the "
            "answer that issued its first voucher while it had no live token"
        }
    )


class StatementEntrySchema(Schema):
    """One ledger entry touching the voucher (double entry, never edited)."""

    id = fields.Integer()
    account = fields.String(metadata={"description": "the ledger account moved"})
    amount_fen = _fen()
    reference = fields.String(
        metadata={"description": "what moved it: issue, a usage record, a release"}
    )
    created_at = UtcTimestamp()


class StatementSchema(Schema):
    voucher = fields.Nested(VoucherSchema)
    entries = fields.List(fields.Nested(StatementEntrySchema))
    total = fields.Integer()
    limit = fields.Integer()
    offset = fields.Integer()


class ReplayResultSchema(Schema):
    outcome = fields.String(metadata={"description": "applied | dead_letter"})
    reason = fields.String(allow_none=True)


class AuditEntrySchema(Schema):
    id = fields.Integer()
    at = UtcTimestamp()
    actor = fields.String(metadata={"description": "the caller's role"})
    token_sha256 = fields.String(
        allow_none=True, metadata={"description": "first 16 hex of the token's hash"}
    )
    scope = fields.String(allow_none=True)
    action = fields.String()
    method = fields.String()
    path = fields.String()
    status = fields.Integer()
    remote_addr = fields.String(allow_none=True)
    details = fields.Dict()


class RefusedWritesSchema(Schema):
    """Anonymous writes refused at one endpoint with one status: counted,
    not each stored (gateway/audit.py)."""

    action = fields.String(metadata={"description": "the endpoint, or unknown"})
    status = fields.Integer()
    count = fields.Integer()
    first_at = UtcTimestamp()
    last_at = UtcTimestamp()


class TokenSchema(Schema):
    """A portal token as listed: its id, never the secret or its digest."""

    id = fields.String(metadata={"description": "tok_ and 16 hex digits"})
    role = fields.String()
    status = fields.String(
        validate=validate.OneOf(["active", "expired", "revoked"]),
    )
    created_at = UtcTimestamp()
    expires_at = UtcTimestamp(
        allow_none=True, metadata={"description": "null: never expires"}
    )
    revoked_at = UtcTimestamp(allow_none=True)
    last_used_at = UtcTimestamp(
        allow_none=True, metadata={"description": "to within 5 minutes"}
    )


class CompanyTokenSchema(TokenSchema):
    """A company's token as re-issued: the secret, shown only here."""

    class Meta:
        exclude = ("status", "created_at", "revoked_at", "last_used_at")

    token = fields.String(metadata={"description": "the bearer token, shown once"})
    revoked_tokens = fields.Integer(
        metadata={"description": "how many earlier tokens were revoked"}
    )


class TenantUsageSchema(Schema):
    tenant_id = fields.String()
    city = fields.String(allow_none=True)
    voucher_code = fields.String(allow_none=True)
    records = fields.Integer()
    gpu_seconds = fields.Integer()
    cost_fen = _fen()


class HourlyUsageSchema(Schema):
    hour = UtcTimestamp(metadata={"description": "start of the hour"})
    records = fields.Integer()
    gpu_seconds = fields.Integer()
    cost_fen = _fen()
