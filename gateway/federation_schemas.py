"""Schemas of the federation endpoints (``gateway/federation_api.py``): admitting
cities, registering data centres and their keys, the national overview,
reconciliation and recommendations. Money in fen, rates in basis points."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, post_load, validate

from gateway.schemas import CitySchema, DatacenterSchema
from services.common.contracts import CITY_CODE_PATTERN, UtcTimestamp
from services.common.vouchercode import PREFIX_PATTERN

DATACENTER_ID_PATTERN = r"^[a-z0-9-]+$"


class _Strict(Schema):
    class Meta:
        unknown = RAISE


# -- requests ---------------------------------------------------------------


class CityAdmissionSchema(_Strict):
    code = fields.String(
        required=True,
        validate=[validate.Regexp(CITY_CODE_PATTERN), validate.Length(max=48)],
    )
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    # Not in CONTRACTS.md §7 (an extension: a client that sends only code
    # and name is assigned one).
    voucher_prefix = fields.String(
        load_default=None,
        validate=validate.Regexp(
            PREFIX_PATTERN, error="voucher_prefix must be 2-4 capital letters A-Z"
        ),
        metadata={
            "description": "optional: the voucher prefix the city asks for "
            "(2-4 capitals). The registry reserves it if no other city holds "
            "it, else one derived from the city code; the answer's "
            "city.voucher_prefix is the one reserved, for good."
        },
    )


class InventoryItemRequestSchema(_Strict):
    gpu_model = fields.String(required=True, validate=validate.Length(min=1, max=64))
    count = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))
    chip_origin = fields.String(
        required=True, validate=validate.OneOf(["domestic", "imported"])
    )
    price_fen_per_gpu_hour = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0)
    )


class DatacenterRegistrationSchema(_Strict):
    id = fields.String(
        required=True,
        validate=[validate.Regexp(DATACENTER_ID_PATTERN), validate.Length(max=48)],
    )
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    operator = fields.String(required=True, validate=validate.Length(min=1, max=200))
    city = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Length(min=1, max=64),
        metadata={
            "description": "optional (not in CONTRACTS.md §7): the city the "
            "centre stands in, for people; null when not given"
        },
    )
    hub_region = fields.String(required=True, validate=validate.Length(min=1, max=64))
    government_run = fields.Boolean(required=True)
    inventory = fields.List(
        fields.Nested(InventoryItemRequestSchema),
        required=True,
        validate=validate.Length(min=1),
    )
    # A Datacenter as GET answers it (CONTRACTS.md §7) may be posted back
    # whole: its utilisation is measured by metering, never declared.
    utilisation = fields.Raw(
        load_default=None,
        allow_none=True,
        metadata={"description": "ignored: measured, not declared"},
    )

    @post_load
    def _drop_measured(self, data: dict, **_: object) -> dict:
        data.pop("utilisation", None)
        return data


class RecommendationQuerySchema(_Strict):
    gpu_model = fields.String(required=True)
    gpus = fields.Integer(load_default=1, validate=validate.Range(min=1, max=100_000))
    hours = fields.Float(load_default=1.0, validate=validate.Range(min=0.01, max=8784))
    voucher = fields.String(load_default=None)


class RebuildRequestSchema(_Strict):
    city = fields.String(load_default=None, validate=validate.Regexp(CITY_CODE_PATTERN))


# -- responses --------------------------------------------------------------


class AmqpCredentialsSchema(Schema):
    username = fields.String()
    password = fields.String()


class CityAdmittedSchema(Schema):
    city = fields.Nested(CitySchema)
    admin_token = fields.String(metadata={"description": "shown once"})
    amqp = fields.Nested(AmqpCredentialsSchema, metadata={"description": "shown once"})


class DatacenterRegisteredSchema(Schema):
    datacenter = fields.Nested(DatacenterSchema)
    key_id = fields.String()
    secret = fields.String(metadata={"description": "HMAC secret, shown once"})
    amqp = fields.Nested(AmqpCredentialsSchema, metadata={"description": "shown once"})
    token = fields.String(metadata={"description": "portal token datacenter:<id>"})


class SigningKeySchema(Schema):
    key_id = fields.String()
    secret = fields.String(metadata={"description": "only when the key is issued"})
    created_at = UtcTimestamp(allow_none=True)
    revoked_at = UtcTimestamp(allow_none=True)
    active = fields.Boolean()


class RecommendationSchema(Schema):
    rank = fields.Integer()
    datacenter_id = fields.String()
    name = fields.String()
    hub_region = fields.String()
    government_run = fields.Boolean()
    gpu_model = fields.String()
    chip_origin = fields.String()
    price_fen_per_gpu_hour = fields.Integer()
    gpu_seconds = fields.Integer()
    cost_fen = fields.Integer()
    rate_bp = fields.Integer()
    subsidy_fen = fields.Integer()
    net_cost_fen = fields.Integer()
    voucher_applies = fields.Boolean()
    spare_gpus = fields.Integer()
    utilisation = fields.Float(allow_none=True)
    explanation = fields.List(fields.String())


class RecommendationsSchema(Schema):
    gpu_model = fields.String()
    gpus = fields.Integer()
    hours = fields.Float()
    voucher = fields.String(allow_none=True)
    items = fields.List(fields.Nested(RecommendationSchema))


class OverviewSchema(Schema):
    as_of = fields.String()
    totals = fields.Dict()
    cities = fields.List(fields.Dict())
    datacenters = fields.List(fields.Dict())
    regions = fields.Dict(keys=fields.String(), values=fields.Dict())


class DriftSchema(Schema):
    city = fields.String()
    program_id = fields.String(allow_none=True)
    field = fields.String()
    registry = fields.Integer()
    ledger = fields.Integer()
    difference = fields.Integer()


class ReconciliationSchema(Schema):
    as_of = fields.String()
    ok = fields.Boolean()
    cities = fields.Dict(keys=fields.String(), values=fields.Dict())
    drift = fields.List(fields.Nested(DriftSchema))
