"""A voucher's bindings on the portal: its holder's consent (CONTRACTS.md §7,
DESIGN.md §9).

A data centre only *asks* for a tenant (``PUT /v1/tenants/<t>/voucher`` on
its gateway becomes a ``binding_requested`` event for the voucher's city);
the voucher pays for that tenant's records only once its holder, the
company, has authorised the tenant at that data centre here, and only for
records that started after the authorisation:

- ``GET /api/v1/vouchers/<code>/bindings``: its company, its city's staff,
  the ministry; every tenant asked for, authorised or withdrawn;
- ``PUT /api/v1/vouchers/<code>/bindings/<datacenter_id>/<tenant_id>``: its
  company authorises (also without a prior request);
- ``DELETE`` of the same: its company withdraws; later records of the tenant
  are refused ``tenant_not_authorised``.

City staff and the ministry read but never decide: the money is the
company's to spend. Another company learns nothing, not even that the
voucher exists (404, as for the voucher itself).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify
from marshmallow import Schema, fields

from gateway.audit import note
from gateway.auth import COMPANY, forbid, require_role
from gateway.review_api import _err, _ok, _param
from gateway.vouchers import check_holder, parse_code, voucher_city
from services.common.contracts import UtcTimestamp

bindings = Blueprint("bindings", __name__, url_prefix="/api/v1")


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


class BindingSchema(Schema):
    """A tenant at a data centre, as the voucher's holder decided it."""

    voucher_code = fields.String()
    datacenter_id = fields.String()
    tenant_id = fields.String()
    status = fields.String(metadata={"description": "requested|authorised|withdrawn"})
    requested_at = UtcTimestamp(allow_none=True)
    authorised_at = UtcTimestamp(
        allow_none=True,
        metadata={"description": "records that started before are not paid for"},
    )
    withdrawn_at = UtcTimestamp(allow_none=True)
    updated_at = UtcTimestamp()


class BindingListSchema(Schema):
    voucher_code = fields.String()
    items = fields.List(fields.Nested(BindingSchema))


def _read(code: str) -> tuple[Any, str, str, dict]:
    """``(role, code, city, list_bindings answer)`` for a caller who may see
    the voucher."""
    parse_code(code)
    role = require_role()
    code, city = voucher_city(code, role)
    found = _rpc(f"vouchers_{city}", "list_bindings", code)
    check_holder(role, found["voucher"], code)
    return role, code, city, found


@bindings.get("/vouchers/<code>/bindings")
def list_bindings(code: str):
    """Every tenant asked for or authorised on the voucher."""
    _, code, _, found = _read(code)
    return jsonify(
        BindingListSchema().dump({"voucher_code": code, "items": found["items"]})
    )


def _decide(code: str, datacenter_id: str, tenant_id: str, method: str):
    role, code, city, _ = _read(code)
    if role.kind != COMPANY:
        raise forbid("only the voucher's holder decides which tenants it pays for")
    # A data centre that is not a member is 404, not a binding nobody can use.
    _rpc("city_registry", "get_datacenter", datacenter_id)
    binding = _rpc(
        f"vouchers_{city}", method, code, datacenter_id, tenant_id, str(role)
    )
    note(voucher_code=code, datacenter_id=datacenter_id, tenant_id=tenant_id)
    return jsonify(BindingSchema().dump(binding))


@bindings.put("/vouchers/<code>/bindings/<datacenter_id>/<tenant_id>")
def authorise_binding(code: str, datacenter_id: str, tenant_id: str):
    """The holder authorises a tenant: its records from now on are paid for."""
    return _decide(code, datacenter_id, tenant_id, "authorise_binding")


@bindings.delete("/vouchers/<code>/bindings/<datacenter_id>/<tenant_id>")
def withdraw_binding(code: str, datacenter_id: str, tenant_id: str):
    """The holder withdraws a tenant: its later records are refused."""
    return _decide(code, datacenter_id, tenant_id, "withdraw_binding")


# -- OpenAPI -----------------------------------------------------------------

_AUTH = [{"bearer": []}]
_BINDING_PARAMS = [_param("code"), _param("datacenter_id"), _param("tenant_id")]

OPENAPI_SCHEMAS = {"Binding": BindingSchema, "BindingList": BindingListSchema}

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/vouchers/{code}/bindings": {
        "get": {
            "summary": "Tenants asked for, authorised or withdrawn on a voucher "
            "(its company, its city's staff, national admin)",
            "security": _AUTH,
            "parameters": [_param("code")],
            "responses": {
                "200": _ok("the voucher's bindings", "BindingList"),
                **_err(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/vouchers/{code}/bindings/{datacenter_id}/{tenant_id}": {
        "put": {
            "summary": "Its holder authorises a tenant at a data centre: records "
            "that start from now on are subsidised",
            "security": _AUTH,
            "parameters": _BINDING_PARAMS,
            "responses": {
                "200": _ok("the binding, authorised", "Binding"),
                **_err(400, 401, 403, 404, 409),
            },
        },
        "delete": {
            "summary": "Its holder withdraws a tenant: its later records are "
            "refused tenant_not_authorised",
            "security": _AUTH,
            "parameters": _BINDING_PARAMS,
            "responses": {
                "200": _ok("the binding, withdrawn", "Binding"),
                **_err(400, 401, 403, 404, 409),
            },
        },
    },
}
