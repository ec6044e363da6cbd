"""The federation endpoints of ``/api/v1``: admitting and removing cities,
registering and removing data centres, their signing keys (rotation with
overlap, revocation), the national overview, reconciliation and
recommendations. All behind ``city_registry`` (docs/onboarding.md).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request

from gateway import directory
from gateway.auth import COMPANY, forbid, require_role
from gateway.federation_schemas import (
    AmqpCredentialsSchema,
    CityAdmissionSchema,
    CityAdmittedSchema,
    DatacenterRegisteredSchema,
    DatacenterRegistrationSchema,
    OverviewSchema,
    RebuildRequestSchema,
    RecommendationQuerySchema,
    RecommendationsSchema,
    ReconciliationSchema,
    SigningKeySchema,
)
from gateway.schemas import CitySchema, DatacenterSchema
from gateway.vouchers import parse_code, voucher_city
from services.common.errors import InvalidRequest

federation = Blueprint("federation", __name__, url_prefix="/api/v1")


def _rpc(method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call("city_registry", method, *args, **kwargs)


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if body is None and not request.get_data():
        return {}
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_request", "the body must be a JSON object")
    return body


def _national_admin() -> None:
    if not require_role().is_national_admin:
        raise forbid("only the national admin may do this")


def _admin_or_datacenter(datacenter_id: str) -> None:
    role = require_role()
    if not (role.is_national_admin or role.is_datacenter(datacenter_id)):
        raise forbid("only the national admin and the data centre itself")


# -- cities -----------------------------------------------------------------


@federation.post("/cities")
def admit_city():
    _national_admin()
    body = CityAdmissionSchema().load(_json_body())
    # Asked for only when the body names one: the call of a client that sends
    # CONTRACTS §7's fields is the one a registry before issue 14 answers.
    requested = (
        {"voucher_prefix": body["voucher_prefix"]} if body["voucher_prefix"] else {}
    )
    admitted = _rpc("admit_city", body["code"], body["name"], **requested)
    directory.invalidate()
    return jsonify(CityAdmittedSchema().dump(admitted)), 201


def _broker_credentials(kind: str, member: str):
    """A new broker password for a member, shown once (docs/security.md)."""
    _national_admin()
    granted = _rpc("grant_member_credentials", kind, member)
    return jsonify(AmqpCredentialsSchema().dump(granted)), 201


@federation.post("/cities/<city>/broker-credentials")
def city_broker_credentials(city: str):
    return _broker_credentials("city", city)


@federation.post("/datacenters/<datacenter_id>/broker-credentials")
def datacenter_broker_credentials(datacenter_id: str):
    return _broker_credentials("datacenter", datacenter_id)


@federation.delete("/cities/<city>")
def remove_city(city: str):
    _national_admin()
    removed = _rpc("remove_city", city)
    directory.invalidate()
    return jsonify(CitySchema().dump(removed))


# -- data centres -----------------------------------------------------------


@federation.post("/datacenters")
def register_datacenter():
    _national_admin()
    registration = DatacenterRegistrationSchema().load(_json_body())
    registered = _rpc("register_datacenter", registration)
    return jsonify(DatacenterRegisteredSchema().dump(registered)), 201


@federation.delete("/datacenters/<datacenter_id>")
def remove_datacenter(datacenter_id: str):
    _national_admin()
    return jsonify(DatacenterSchema().dump(_rpc("remove_datacenter", datacenter_id)))


@federation.get("/datacenters/<datacenter_id>/keys")
def list_keys(datacenter_id: str):
    _admin_or_datacenter(datacenter_id)
    keys = _rpc("list_datacenter_keys", datacenter_id)
    return jsonify({"items": SigningKeySchema(many=True).dump(keys)})


@federation.post("/datacenters/<datacenter_id>/keys")
def rotate_key(datacenter_id: str):
    """A new key; the previous one stays active until the next rotation or a
    revocation, so the data centre's gateway can switch without a gap."""
    _admin_or_datacenter(datacenter_id)
    key = _rpc("issue_datacenter_key", datacenter_id)
    return jsonify(SigningKeySchema().dump(key | {"active": True})), 201


@federation.delete("/datacenters/<datacenter_id>/keys/<key_id>")
def revoke_key(datacenter_id: str, key_id: str):
    _admin_or_datacenter(datacenter_id)
    return jsonify(_rpc("revoke_datacenter_key", datacenter_id, key_id))


@federation.get("/datacenters/recommendations")
def recommendations():
    """Public without ``voucher``; with it, only the voucher's company, its
    city's staff and the national admin (a voucher's balance is private)."""
    query = RecommendationQuerySchema().load(request.args.to_dict())
    voucher, company_id = query["voucher"], None
    if voucher is not None:
        parse_code(voucher)  # 400 before the token is even checked
        role = require_role()
        voucher, _city = voucher_city(voucher, role)
        if role.kind == COMPANY:
            company_id = role.company_id  # the registry checks the holder
    ranked = _rpc(
        "recommend_datacenters",
        query["gpu_model"],
        query["gpus"],
        query["hours"],
        voucher=voucher,
        company_id=company_id,
    )
    return jsonify(RecommendationsSchema().dump(ranked))


# -- the national view ------------------------------------------------------


@federation.get("/network/overview")
def overview():
    return jsonify(OverviewSchema().dump(_rpc("national_overview")))


@federation.post("/network/reconciliation")
def reconcile():
    _national_admin()
    return jsonify(ReconciliationSchema().dump(_rpc("reconcile")))


@federation.post("/network/reconciliation/rebuild")
def rebuild():
    _national_admin()
    body = RebuildRequestSchema().load(_json_body())
    return jsonify(_rpc("rebuild_read_model", body["city"]))


_RETRY_AFTER_503 = (
    "503 `broker_unavailable`: the member is kept as pending and its broker "
    "user was not granted; the same request again completes the onboarding "
    "(docs/onboarding.md). 409 only once its credentials were delivered."
)


def _ok(description: str, schema: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _err(*statuses: int) -> dict[str, Any]:
    return {str(status): _ok("error", "Error") for status in (*statuses, 503)}


def _param(name: str) -> dict[str, Any]:
    return {"in": "path", "name": name, "required": True, "schema": {"type": "string"}}


_ADMIN = [{"bearer": []}]

OPENAPI_SCHEMAS = {
    "CityAdmission": CityAdmissionSchema,
    "CityAdmitted": CityAdmittedSchema,
    "DatacenterRegistration": DatacenterRegistrationSchema,
    "DatacenterRegistered": DatacenterRegisteredSchema,
    "SigningKey": SigningKeySchema,
    "Recommendations": RecommendationsSchema,
    "Overview": OverviewSchema,
    "Reconciliation": ReconciliationSchema,
}


def _rotate_broker_password(member: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": f"A new broker password for the {member} (national admin), "
            "shown once; the old one is refused from the next connection",
            "security": _ADMIN,
            "parameters": [_param("city" if member == "city" else "datacenter_id")],
            "responses": {
                "201": _ok("user and password", "AmqpCredentials"),
                **_err(401, 403, 404, 409),
            },
        }
    }


OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/cities/{city}/broker-credentials": _rotate_broker_password("city"),
    "/api/v1/datacenters/{datacenter_id}/broker-credentials": (
        _rotate_broker_password("data centre")
    ),
    "/api/v1/cities": {
        "post": {
            "summary": "Admit a city (national admin): credentials returned once; "
            "its voucher prefix reserved (the requested one if free)",
            "description": _RETRY_AFTER_503,
            "security": _ADMIN,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": "CityAdmission"}},
            },
            "responses": {
                "201": _ok("token and AMQP user", "CityAdmitted"),
                **_err(400, 401, 403, 409),
            },
        }
    },
    "/api/v1/cities/{city}": {
        "delete": {
            "summary": "Remove a city: AMQP user deleted, tokens revoked, history kept",
            "security": _ADMIN,
            "parameters": [_param("city")],
            "responses": {"200": _ok("the city", "City"), **_err(401, 403, 404, 409)},
        }
    },
    "/api/v1/datacenters": {
        "post": {
            "summary": "Register a data centre (national admin): keys returned once",
            "description": _RETRY_AFTER_503,
            "security": _ADMIN,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": "DatacenterRegistration"}},
            },
            "responses": {
                "201": _ok("key, secret, AMQP user", "DatacenterRegistered"),
                **_err(400, 401, 403, 409),
            },
        }
    },
    "/api/v1/datacenters/{datacenter_id}": {
        "delete": {
            "summary": "Remove a data centre: keys revoked, AMQP user deleted",
            "security": _ADMIN,
            "parameters": [_param("datacenter_id")],
            "responses": {
                "200": _ok("the data centre", "Datacenter"),
                **_err(401, 403, 404, 409),
            },
        }
    },
    "/api/v1/datacenters/{datacenter_id}/keys": {
        "get": {
            "summary": "Signing keys, without secrets (national admin, the centre)",
            "security": _ADMIN,
            "parameters": [_param("datacenter_id")],
            "responses": {
                "200": _ok("keys", {"type": "object"}),
                **_err(401, 403, 404),
            },
        },
        "post": {
            "summary": "Rotate: a new key; the previous stays active (overlap)",
            "security": _ADMIN,
            "parameters": [_param("datacenter_id")],
            "responses": {
                "201": _ok("the new key", "SigningKey"),
                **_err(401, 403, 404),
            },
        },
    },
    "/api/v1/datacenters/{datacenter_id}/keys/{key_id}": {
        "delete": {
            "summary": "Revoke a key: records signed with it become bad_signature",
            "security": _ADMIN,
            "parameters": [_param("datacenter_id"), _param("key_id")],
            "responses": {
                "200": _ok("revoked", {"type": "object"}),
                **_err(401, 403, 404),
            },
        }
    },
    "/api/v1/datacenters/recommendations": {
        "get": {
            "summary": "Data centres ranked by net cost after the voucher, then spare",
            "description": (
                "Public without `voucher`. With `voucher` it needs the "
                "voucher's company, its city's staff or the national admin: "
                "no token 401, another role or city 403, another company's "
                "voucher or a prefix no city issues 404, a mistyped code 400."
            ),
            "security": [{}, {"bearer": []}],
            "parameters": [
                {"in": "query", "schema": RecommendationQuerySchema},
            ],
            "responses": {
                "200": _ok("ranked, each explained", "Recommendations"),
                **_err(400, 401, 403, 404, 409),
            },
        }
    },
    "/api/v1/network/overview": {
        "get": {
            "summary": "Per city, data centre and hub region; 24 h and 7 d",
            "responses": {"200": _ok("the national view", "Overview")},
        }
    },
    "/api/v1/network/reconciliation": {
        "post": {
            "summary": "Compare the read model with every live city's ledger",
            "security": _ADMIN,
            "responses": {
                "200": _ok("drift, named", "Reconciliation"),
                **_err(401, 403),
            },
        }
    },
    "/api/v1/network/reconciliation/rebuild": {
        "post": {
            "summary": "Rebuild the read model from the cities' ledgers",
            "security": _ADMIN,
            "responses": {
                "200": _ok("cities rebuilt", {"type": "object"}),
                **_err(400, 401, 403),
            },
        }
    },
}
