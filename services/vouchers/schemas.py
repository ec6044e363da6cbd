"""What enters and leaves a city's voucher service (CONTRACTS.md §7 bodies)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from services.common.contracts import CreditCode, UtcTimestamp


class CompanySchema(Schema):
    class Meta:
        unknown = RAISE

    # the unified social credit code: refused by its check character
    registration_id = CreditCode(required=True)
    name = fields.String(required=True, validate=validate.Length(1, 256))
    registered_in = fields.String(required=True, validate=validate.Length(1, 64))
    employees = fields.Integer(
        strict=True, load_default=None, allow_none=True, validate=validate.Range(min=0)
    )
    annual_revenue_cny = fields.Integer(
        strict=True, load_default=None, allow_none=True, validate=validate.Range(min=0)
    )
    government_research_project = fields.Boolean(load_default=None, allow_none=True)
    founded_on = fields.Date(load_default=None, allow_none=True)
    sector = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(max=64)
    )


class ApplicationRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    program_id = fields.String(required=True, validate=validate.Length(1, 64))
    company = fields.Nested(CompanySchema, required=True)
    requested_face_value_cny = fields.Integer(
        strict=True, required=True, validate=validate.Range(min=1)
    )


class ReasonSchema(Schema):
    rule = fields.String()
    passed = fields.Boolean()
    evidence = fields.String()


class RedemptionSchema(Schema):
    record_id = fields.String()
    datacenter_id = fields.String()
    kind = fields.String()  # extension: usage | reversal
    gpu_seconds = fields.Integer()
    cost_fen = fields.Integer()
    rate_bp = fields.Integer()  # extension
    subsidy_fen = fields.Integer()
    booked_at = UtcTimestamp()  # extension


class RedemptionLineSchema(Schema):
    """One line of ``list_redemptions``: booked, clawed back (a reversal) or
    refused. ``tenant_id``, ``started_at`` and ``ended_at`` (CONTRACTS.md §7)
    are kept on booked rows from migration 0008 on: null on older ones and on
    refused or held lines. A refused line has no GPU-seconds or money
    (nothing was booked)."""

    record_id = fields.String()
    datacenter_id = fields.String()
    tenant_id = fields.String(allow_none=True, dump_default=None)
    started_at = UtcTimestamp(allow_none=True, dump_default=None)
    ended_at = UtcTimestamp(allow_none=True, dump_default=None)
    gpu_seconds = fields.Integer(allow_none=True)
    cost_fen = fields.Integer(allow_none=True)
    subsidy_fen = fields.Integer(allow_none=True)
    status = fields.String()  # booked | held | refused | clawed_back
    kind = fields.String()  # extension: usage | reversal
    rate_bp = fields.Integer(allow_none=True)  # extension
    booked_at = UtcTimestamp()  # extension: booked, or refused, at
    reason = fields.String(allow_none=True)  # extension: why it was refused


class HeldUsageSchema(Schema):
    """One record of the review queue (``list_held``): what it claimed, why
    it is held (the evidence: the hour's totals, the overlapping records),
    what it would book (``subsidy_fen``), and the verdict once decided."""

    datacenter_id = fields.String()
    record_id = fields.String()
    voucher_code = fields.String(allow_none=True)
    program_id = fields.String(allow_none=True)
    reason = fields.String()  # over_capacity | double_claim
    evidence = fields.Dict()
    retroactive = fields.Boolean()  # held after it was booked (usage_hold)
    tenant_id = fields.String(allow_none=True)
    gpu_model = fields.String(allow_none=True)
    started_at = fields.String(allow_none=True)
    ended_at = fields.String(allow_none=True)
    gpu_seconds = fields.Integer()
    cost_fen = fields.Integer()
    subsidy_fen = fields.Integer()
    status = fields.String()  # held | released | refused
    held_at = UtcTimestamp()
    decided_at = UtcTimestamp(allow_none=True)
    decided_by = fields.String(allow_none=True)
    decision_reason = fields.String(allow_none=True)


class VoucherSchema(Schema):
    code = fields.String()
    city = fields.String()
    program_id = fields.String()
    company_id = fields.String()
    status = fields.String()
    face_value_fen = fields.Integer()
    balance_fen = fields.Integer()
    redeemed_fen = fields.Integer()
    released_fen = fields.Integer()
    issued_at = UtcTimestamp()
    expires_at = UtcTimestamp()
    redemptions = fields.List(fields.Nested(RedemptionSchema))
    redemptions_total = fields.Integer()  # extension: the list holds the latest 100
    closed_at = UtcTimestamp(allow_none=True)  # extension: expired or revoked at
    close_reason = fields.String(allow_none=True)  # extension


class ApplicationResponseSchema(Schema):
    application_id = fields.String()
    decision = fields.String()
    reasons = fields.List(fields.Nested(ReasonSchema))
    rules_version = fields.String()
    voucher = fields.Nested(VoucherSchema, allow_none=True)


class ProgramStateSchema(Schema):
    program_id = fields.String()
    kind = fields.String()
    budget_fen = fields.Integer()
    rate_bp = fields.Integer()
    max_rate_bp = fields.Integer()  # extension
    available_fen = fields.Integer()
    committed_fen = fields.Integer()
    redeemed_fen = fields.Integer()
    released_fen = fields.Integer()
    rules_version = fields.String()  # extension
    rules_sha256 = fields.String()  # extension


class ApplicationSchema(Schema):
    """A stored application: its decision, evidence and review."""

    application_id = fields.String(attribute="id")
    program_id = fields.String()
    company_id = fields.String()
    company = fields.Dict()
    requested_face_value_fen = fields.Integer()
    decision = fields.String()  # approved | rejected | pending_review
    # The portal's review queue filters on "status"; it is the decision.
    status = fields.Method("get_status")
    reasons = fields.List(fields.Nested(ReasonSchema))
    rules_version = fields.String()
    rules_sha256 = fields.String()
    decided_at = UtcTimestamp()
    reviewed_by = fields.String(allow_none=True)
    reviewed_at = UtcTimestamp(allow_none=True)
    review_reason = fields.String(allow_none=True)
    voucher_code = fields.String(allow_none=True)
    voucher = fields.Nested(VoucherSchema, allow_none=True)

    def get_status(self, application) -> str:
        if isinstance(application, dict):
            return application["decision"]
        return application.decision


class LedgerEntrySchema(Schema):
    id = fields.Integer()
    account = fields.String()
    amount_fen = fields.Integer()
    reference = fields.String()
    created_at = UtcTimestamp()


class StatementLineSchema(Schema):
    """A job of a monthly statement, or (negative) a subsidy given back."""

    record_id = fields.String()
    datacenter_id = fields.String()
    kind = fields.String()  # usage | released | clawback | reversal | held
    tenant_id = fields.String(allow_none=True)
    gpu_model = fields.String(allow_none=True)
    gpu_count = fields.Integer(allow_none=True)
    started_at = UtcTimestamp(allow_none=True)
    ended_at = UtcTimestamp(allow_none=True)
    gpu_seconds = fields.Integer()
    gpu_hours = fields.String()  # for people: 2 decimals, from the seconds
    cost_fen = fields.Integer()
    rate_bp = fields.Integer()
    subsidy_fen = fields.Integer()
    company_pays_fen = fields.Integer()
    booked_at = UtcTimestamp()


class StatementReleaseSchema(Schema):
    reason = fields.String()  # expired | revoked | <kind>_after_close
    released_fen = fields.Integer()
    released_at = UtcTimestamp()
    datacenter_id = fields.String(allow_none=True)
    record_id = fields.String(allow_none=True)
    reference = fields.String()


class StatementTotalsSchema(Schema):
    jobs = fields.Integer()
    gpu_seconds = fields.Integer()
    gpu_hours = fields.String()
    cost_fen = fields.Integer()
    subsidies_fen = fields.Integer()
    company_pays_fen = fields.Integer()
    clawbacks_fen = fields.Integer()
    released_fen = fields.Integer()
    issued_fen = fields.Integer()


class MonthlyStatementSchema(Schema):
    """``monthly_statement``: opening + issued − subsidies + clawbacks −
    released = closing, every figure from the ledger's postings."""

    voucher_code = fields.String()
    month = fields.String()
    period_start = UtcTimestamp()
    period_end = UtcTimestamp()
    city = fields.String()
    city_name = fields.String()
    program_id = fields.String()
    program_kind = fields.String(allow_none=True)
    company_id = fields.String()
    company_name = fields.String(allow_none=True)
    face_value_fen = fields.Integer()
    issued_at = UtcTimestamp()
    expires_at = UtcTimestamp()
    status = fields.String()
    opening_balance_fen = fields.Integer()
    closing_balance_fen = fields.Integer()
    jobs = fields.List(fields.Nested(StatementLineSchema))
    clawbacks = fields.List(fields.Nested(StatementLineSchema))
    releases = fields.List(fields.Nested(StatementReleaseSchema))
    totals = fields.Nested(StatementTotalsSchema)
    reconciled = fields.Boolean()


class ProgramTotalsSchema(Schema):
    program_id = fields.String()
    budget_fen = fields.Integer()
    available_fen = fields.Integer()
    committed_fen = fields.Integer()
    redeemed_fen = fields.Integer()
    released_fen = fields.Integer()
    vouchers_issued = fields.Integer()


class LedgerTotalsSchema(Schema):
    city = fields.String()
    as_of = UtcTimestamp()
    programs = fields.List(fields.Nested(ProgramTotalsSchema))


class BindingSchema(Schema):
    """A tenant of a data centre the voucher may pay for (CONTRACTS.md §7)."""

    voucher_code = fields.String()
    datacenter_id = fields.String()
    tenant_id = fields.String()
    status = fields.String()  # requested | authorised | withdrawn
    requested_at = UtcTimestamp(allow_none=True)
    authorised_at = UtcTimestamp(allow_none=True)
    withdrawn_at = UtcTimestamp(allow_none=True)
    updated_at = UtcTimestamp()
