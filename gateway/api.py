"""The national portal's JSON API, ``/api/v1`` (CONTRACTS.md §7).

Views are thin: check who is calling, validate through a schema, make one or
two RPC calls (``city_registry``, ``metering``, ``vouchers_<city>``), dump the
answer through a response schema. Errors are raised, never returned: the one
table in ``gateway/errors.py`` turns them into responses.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from marshmallow import Schema

from gateway.auth import CITY_ADMIN, COMPANY, TtlCache, forbid, require_role
from gateway.openapi import build_spec
from gateway.schemas import (
    CITY_CODE_PATTERN,
    ApplicationRequestSchema,
    ApplicationResponseSchema,
    CitySchema,
    DatacenterSchema,
    DeadLetterQuerySchema,
    DeadLetterSchema,
    SummarySchema,
    VoucherSchema,
)
from services.common import vouchercode
from services.common.errors import InvalidRequest, NotFound

api = Blueprint("api", __name__, url_prefix="/api/v1")

PREFIX_CACHE = "voucher_prefix_cache"  # key in app.extensions
PREFIX_CACHE_TTL_S = 60.0
_CITY_CODE = re.compile(CITY_CODE_PATTERN)


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


def _dump(schema: Schema, data: Any):
    return jsonify(schema.dump(data))


def _vouchers_service(city: str) -> str:
    return f"vouchers_{city}"


def _city_not_found(city: str) -> NotFound:
    return NotFound("city_not_found", f"no city {city!r} in the network")


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_request", "the body must be a JSON object")
    return body


# -- public aggregates ------------------------------------------------------


@api.get("/network/summary")
def network_summary():
    return _dump(SummarySchema(), _rpc("city_registry", "network_summary"))


@api.get("/cities")
def list_cities():
    return _dump(CitySchema(many=True), _rpc("city_registry", "list_cities"))


@api.get("/cities/<city>")
def get_city(city: str):
    return _dump(CitySchema(), _rpc("city_registry", "get_city", city))


@api.get("/datacenters")
def list_datacenters():
    return _dump(DatacenterSchema(many=True), _rpc("city_registry", "list_datacenters"))


@api.get("/datacenters/<datacenter_id>")
def get_datacenter(datacenter_id: str):
    return _dump(
        DatacenterSchema(), _rpc("city_registry", "get_datacenter", datacenter_id)
    )


# -- vouchers ---------------------------------------------------------------


@api.post("/cities/<city>/applications")
def apply(city: str):
    role = require_role()
    may_apply = (
        role.is_national_admin or role.is_city_admin(city) or role.is_company(city)
    )
    if not may_apply:
        raise forbid(f"only {city}'s companies and staff may apply to it")
    # The city code becomes a service name: never route an arbitrary string.
    if not _CITY_CODE.match(city):
        raise _city_not_found(city)
    _rpc("city_registry", "get_city", city)  # NotFound city_not_found
    application = ApplicationRequestSchema().load(_json_body())
    registration_id = application["company"]["registration_id"]
    if role.kind == COMPANY and not role.is_company(city, registration_id):
        raise forbid("a company may apply only for itself")
    # Dump again so that dates travel as ISO strings, as the contract says.
    payload = ApplicationRequestSchema().dump(application)
    decision = _rpc(_vouchers_service(city), "apply", payload)
    return _dump(ApplicationResponseSchema(), decision), 201


def _city_of_prefix(prefix: str) -> str | None:
    """The city issuing codes with ``prefix``; the mapping is cached, and
    fetched again on a miss so that a newly admitted city is found at once."""
    cache: TtlCache = current_app.extensions[PREFIX_CACHE]

    def load():
        return _rpc("city_registry", "voucher_prefixes")

    prefixes = cache.get_or_load("prefixes", load, lambda _: PREFIX_CACHE_TTL_S)
    if prefix not in prefixes:
        cache.clear()
        prefixes = cache.get_or_load("prefixes", load, lambda _: PREFIX_CACHE_TTL_S)
    return prefixes.get(prefix)


@api.get("/vouchers/<code>")
def get_voucher(code: str):
    # A mistyped code is refused by its check character before any lookup
    # (CONTRACTS.md §4), even before the token is checked.
    try:
        prefix = vouchercode.parse(code)
    except vouchercode.InvalidVoucherCode as exc:
        raise InvalidRequest("invalid_voucher_code", str(exc)) from exc
    code = code.strip().upper()
    role = require_role()
    not_found = NotFound("voucher_not_found", f"no voucher {code}")
    if not (role.is_national_admin or role.kind in (CITY_ADMIN, COMPANY)):
        raise forbid("vouchers are visible to their company and city only")
    city = _city_of_prefix(prefix)
    if city is None:
        raise not_found
    if role.kind in (CITY_ADMIN, COMPANY) and role.city != city:
        raise forbid(f"this voucher belongs to {city}")
    voucher = _rpc(_vouchers_service(city), "get_voucher", code)
    # Another company of the same city learns nothing, not even existence.
    if role.kind == COMPANY and voucher.get("company_id") != role.company_id:
        raise not_found
    return _dump(VoucherSchema(), voucher)


# -- data centres' rejected records -----------------------------------------


@api.get("/dead-letters")
def list_dead_letters():
    role = require_role()
    if not (role.is_national_admin or role.is_datacenter()):
        raise forbid("dead letters are visible to the national admin and data centres")
    query = DeadLetterQuerySchema().load(request.args.to_dict())
    if role.is_datacenter():
        wanted = query.get("datacenter_id")
        if wanted is not None and wanted != role.datacenter_id:
            raise forbid("a data centre sees only its own dead letters")
        query["datacenter_id"] = role.datacenter_id
    letters = _rpc(
        "metering",
        "list_dead_letters",
        datacenter_id=query.get("datacenter_id"),
        reason=query.get("reason"),
        limit=query["limit"],
    )
    # A collection is an object with "items", so pagination can be added to it.
    return jsonify({"items": DeadLetterSchema(many=True).dump(letters)})


@api.get("/openapi.json")
def openapi_json():
    return jsonify(build_spec().to_dict())
