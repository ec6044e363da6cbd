"""The OpenAPI 3 document of ``/api/v1``, built from the marshmallow schemas.

Served at ``/api/v1/openapi.json`` so that a city's IT department or an
analyst's script can generate a client without reading our code. Paths are
declared here, next to each other, rather than in view docstrings, so the
whole public surface reads as one page.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from gateway import (
    access,
    bindings_api,
    companies,
    federation_api,
    integrity,
    parked_api,
    review_api,
    schemas,
    statements_api,
)
from services.common.contracts import UtcTimestamp

API_TITLE = "computenet national portal"
API_VERSION = "1.0.0"

_SCHEMAS = {
    "Error": schemas.ErrorSchema,
    "Health": schemas.HealthSchema,
    "Summary": schemas.SummarySchema,
    "City": schemas.CitySchema,
    "Datacenter": schemas.DatacenterSchema,
    # Nested schemas are registered under their own names on first use, so a
    # schema comes before the ones that nest it.
    "Voucher": schemas.VoucherSchema,
    "ApplicationRequest": schemas.ApplicationRequestSchema,
    "ApplicationResponse": schemas.ApplicationResponseSchema,
    "DeadLetter": schemas.DeadLetterSchema,
    "Application": schemas.ApplicationSchema,
    "ReviewRequest": schemas.ReviewRequestSchema,
    "RevokeRequest": schemas.RevokeRequestSchema,
    "Statement": schemas.StatementSchema,
    "RedemptionLine": schemas.RedemptionLineSchema,
    "ReplayResult": schemas.ReplayResultSchema,
    "AuditEntry": schemas.AuditEntrySchema,
    "TenantUsage": schemas.TenantUsageSchema,
    "HourlyUsage": schemas.HourlyUsageSchema,
    "Token": schemas.TokenSchema,
    "RefusedWrites": schemas.RefusedWritesSchema,
}

_AUTH = [{"bearer": []}]


def _json(schema: Any, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "invalid request",
        401: "no or invalid bearer token",
        403: "the caller's role may not do this",
        404: "not found",
        409: "conflict (e.g. budget_exhausted)",
        413: "body_too_large: the body is over MAX_CONTENT_LENGTH (1 MiB by default)",
        503: "a service behind the portal is unavailable",
    }
    return {str(s): _json("Error", text[s]) for s in (*statuses, 503)}


def _with_body_limit(operations: dict[str, Any]) -> dict[str, Any]:
    """Every operation that takes a body may answer 413 (gateway/app.py's
    MAX_CONTENT_LENGTH): said once here rather than in each path."""
    for operation in operations.values():
        if "requestBody" in operation:
            operation["responses"].setdefault("413", _errors(413)["413"])
    return operations


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "in": "path",
        "name": name,
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


def _list(ref: str) -> dict[str, Any]:
    return {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}}


def _collection(ref: str) -> dict[str, Any]:
    """One page of a collection: ``{"items", "total", "limit", "offset"}``."""
    return {
        "type": "object",
        "required": ["items", "total", "limit", "offset"],
        "properties": {
            "items": _list(ref),
            "total": {
                "type": "integer",
                "nullable": True,
                "description": "matching rows; null when the source cannot count",
            },
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
        },
    }


def _table(schema: Any, description: str) -> dict[str, Any]:
    """A 200 that is JSON, or CSV with ``format=csv`` / ``Accept: text/csv``."""
    response = _json(schema, description)
    response["content"]["text/csv"] = {"schema": {"type": "string"}}
    return response


def _query(schema: Any) -> dict[str, Any]:
    return {"in": "query", "schema": schema}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": ref}}}


_PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {
        "get": {
            "summary": "200 when the portal can reach the bus",
            "responses": {"200": _json("Health", "ok"), **_errors()},
        }
    },
    "/api/v1/network/summary": {
        "get": {
            "summary": "National totals: budgets, GPU-seconds, utilisation",
            "responses": {"200": _json("Summary", "the national view")},
        }
    },
    "/api/v1/cities": {
        "get": {
            "summary": "Every city: programs, budget states, live or not",
            "parameters": [_query(schemas.FormatQuerySchema)],
            "responses": {"200": _table(_list("City"), "cities"), **_errors(400)},
        }
    },
    "/api/v1/cities/{city}": {
        "get": {
            "summary": "One city",
            "parameters": [_path_param("city", "city code, e.g. shanghai")],
            "responses": {"200": _json("City", "the city"), **_errors(404)},
        }
    },
    "/api/v1/cities/{city}/applications": {
        "get": {
            "summary": "A city's applications; status=pending_review is its queue",
            "security": _AUTH,
            "parameters": [
                _path_param("city", "city code"),
                _query(schemas.ApplicationQuerySchema),
            ],
            "responses": {
                "200": _table(_collection("Application"), "applications"),
                **_errors(400, 401, 403, 404),
            },
        },
        "post": {
            "summary": "Apply for a voucher (a company for itself, the city's "
            "staff, national)",
            "description": (
                "A company may apply in any city, only for itself "
                "(company.registration_id is its credit code). A mistyped "
                "credit code is 400 invalid_credit_code. The answer that "
                "issues the company's first voucher, while it has no live "
                "portal token, carries `company_token`: shown once, never "
                "again (re-issue: POST /api/v1/companies/{credit_code}/token)."
            ),
            "security": _AUTH,
            "parameters": [_path_param("city", "city code")],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": "ApplicationRequest"}},
            },
            "responses": {
                "201": _json("ApplicationResponse", "the decision, with reasons"),
                **_errors(400, 401, 403, 404, 409),
            },
        },
    },
    "/api/v1/cities/{city}/applications/{application_id}/review": {
        "post": {
            "summary": "Approve or reject an application in review (city staff)",
            "description": (
                "An approval that issues the company's first voucher carries "
                "`company_token` once, as an application's answer would."
            ),
            "security": _AUTH,
            "parameters": [
                _path_param("city", "city code"),
                _path_param("application_id", "the application's id"),
            ],
            "requestBody": _body("ReviewRequest"),
            "responses": {
                "200": _json("Application", "the reviewed application"),
                **_errors(400, 401, 403, 404, 409),
            },
        }
    },
    "/api/v1/vouchers/{code}": {
        "get": {
            "summary": "A voucher: balance, face value, expiry, redemptions",
            "security": _AUTH,
            "parameters": [_path_param("code", "e.g. SH-7K3F9QXD2M4A-R")],
            "responses": {
                "200": _json("Voucher", "the voucher"),
                **_errors(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/datacenters": {
        "get": {
            "summary": "Every data centre: inventory, price, utilisation",
            "parameters": [_query(schemas.FormatQuerySchema)],
            "responses": {
                "200": _table(_list("Datacenter"), "data centres"),
                **_errors(400),
            },
        }
    },
    "/api/v1/datacenters/{datacenter_id}": {
        "get": {
            "summary": "One data centre",
            "parameters": [_path_param("datacenter_id", "data centre id")],
            "responses": {
                "200": _json("Datacenter", "the data centre"),
                **_errors(404),
            },
        }
    },
    "/api/v1/dead-letters/{dead_letter_id}/replay": {
        "post": {
            "summary": "Run a dead letter through metering again (national admin)",
            "security": _AUTH,
            "parameters": [
                {
                    "in": "path",
                    "name": "dead_letter_id",
                    "required": True,
                    "schema": {"type": "integer"},
                }
            ],
            "responses": {
                "200": _json("ReplayResult", "applied, or a dead letter again"),
                **_errors(401, 403, 404),
            },
        }
    },
    "/api/v1/cities/{city}/vouchers": {
        "get": {
            "summary": "A city's vouchers (its staff, national; any company: its own)",
            "security": _AUTH,
            "parameters": [
                _path_param("city", "city code"),
                _query(schemas.VoucherQuerySchema),
            ],
            "responses": {
                "200": _table(_collection("Voucher"), "vouchers"),
                **_errors(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/vouchers/{code}/statement": {
        "get": {
            "summary": "Every ledger entry of a voucher, each subsidised job included",
            "security": _AUTH,
            "parameters": [
                _path_param("code", "e.g. SH-7K3F9QXD2M4A-R"),
                _query(schemas.PageQuerySchema),
            ],
            "responses": {
                "200": _table("Statement", "the statement (CSV: the entries)"),
                **_errors(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/vouchers/{code}/redemptions": {
        "get": {
            "summary": "Every record billed to a voucher (booked, clawed back, "
            "refused), oldest first",
            "security": _AUTH,
            "parameters": [
                _path_param("code", "e.g. SH-7K3F9QXD2M4A-R"),
                _query(schemas.PageQuerySchema),
            ],
            "responses": {
                "200": _table(_collection("RedemptionLine"), "redemption lines"),
                **_errors(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/vouchers/{code}/revoke": {
        "post": {
            "summary": "Revoke a voucher; its balance is released (city staff)",
            "security": _AUTH,
            "parameters": [_path_param("code", "e.g. SH-7K3F9QXD2M4A-R")],
            "requestBody": _body("RevokeRequest"),
            "responses": {
                "200": _json("Voucher", "the revoked voucher"),
                **_errors(400, 401, 403, 404, 409),
            },
        }
    },
    "/api/v1/datacenters/{datacenter_id}/usage/tenants": {
        "get": {
            "summary": "A data centre's usage per tenant (itself, national admin)",
            "security": _AUTH,
            "parameters": [
                _path_param("datacenter_id", "data centre id"),
                _query(schemas.UsageQuerySchema),
            ],
            "responses": {
                "200": _table(_list("TenantUsage"), "usage per tenant"),
                **_errors(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/datacenters/{datacenter_id}/usage/hourly": {
        "get": {
            "summary": "A data centre's usage per hour (itself, national admin)",
            "security": _AUTH,
            "parameters": [
                _path_param("datacenter_id", "data centre id"),
                _query(schemas.UsageQuerySchema),
            ],
            "responses": {
                "200": _table(_list("HourlyUsage"), "usage per hour"),
                **_errors(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/audit": {
        "get": {
            "summary": "Who wrote what, when (national; a city's staff: their city)",
            "security": _AUTH,
            "parameters": [_query(schemas.AuditQuerySchema)],
            "responses": {
                "200": _table(_collection("AuditEntry"), "audit entries"),
                **_errors(400, 401, 403),
            },
        }
    },
    "/api/v1/audit/anonymous": {
        "get": {
            "summary": "Anonymous writes refused, counted per endpoint (national)",
            "description": (
                "A write without a valid token that is refused is counted "
                "here, one row per endpoint and status, instead of an audit "
                "entry each."
            ),
            "security": _AUTH,
            "parameters": [_query(schemas.FormatQuerySchema)],
            "responses": {
                "200": _table(_list("RefusedWrites"), "counts"),
                **_errors(400, 401, 403),
            },
        }
    },
    "/api/v1/tokens": {
        "get": {
            "summary": "Portal tokens by id (national: all or ?role=; others: own)",
            "description": (
                "Never the secret or its digest. A principal other than the "
                "national admin sees only tokens of its own role; asking for "
                "another role is 403."
            ),
            "security": _AUTH,
            "parameters": [_query(schemas.TokenQuerySchema)],
            "responses": {
                "200": _table(_collection("Token"), "tokens"),
                **_errors(400, 401, 403),
            },
        }
    },
    "/api/v1/tokens/{token_id}": {
        "delete": {
            "summary": "Revoke one token (national: any; a principal: its own)",
            "description": (
                "Idempotent: a revoked token keeps its first revoked_at. A "
                "token of another role is 404 token_not_found, as if absent."
            ),
            "security": _AUTH,
            "parameters": [_path_param("token_id", "e.g. tok_0123456789abcdef")],
            "responses": {
                "200": _json("Token", "the revoked token"),
                **_errors(401, 404),
            },
        }
    },
}

# The federation endpoints (issue 6), the companies' and the review's (issue
# 15), the monthly statements (issue 17) declare theirs beside their views.
for _module in (
    federation_api,
    companies,
    review_api,
    bindings_api,
    integrity,
    parked_api,
    statements_api,
):
    for _path, _operations in _module.OPENAPI_PATHS.items():
        _PATHS.setdefault(_path, {}).update(_operations)
    _SCHEMAS.update(_module.OPENAPI_SCHEMAS)


@lru_cache(maxsize=1)
def build_spec() -> APISpec:
    marshmallow_plugin = MarshmallowPlugin()
    spec = APISpec(
        title=API_TITLE,
        version=API_VERSION,
        openapi_version="3.0.3",
        plugins=[marshmallow_plugin],
        info={"description": "CONTRACTS.md §7: the national compute-voucher network"},
    )
    marshmallow_plugin.map_to_openapi_type(UtcTimestamp, "string", "date-time")
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    for name, schema in _SCHEMAS.items():
        spec.components.schema(name, schema=schema)
    roles = {
        (access.openapi_path(rule), method.lower()): sorted(grants)
        for (method, rule), grants in access.ENDPOINT_ACCESS.items()
    }
    for path, operations in _PATHS.items():
        # apispec resolves schemas in place: keep the table above pristine.
        operations = _with_body_limit(copy.deepcopy(operations))
        for method, operation in operations.items():
            # who may call it, from gateway/access.py (the one table)
            operation["x-roles"] = roles.get((path, method), [])
        spec.path(path=path, operations=operations)
    return spec
