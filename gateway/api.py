"""The national portal's JSON API, ``/api/v1`` (CONTRACTS.md §7).

Views are thin: check who is calling, validate through a schema, make one or
two RPC calls (``city_registry``, ``metering``, ``vouchers_<city>``), dump the
answer through a response schema. Errors are raised, never returned: the one
table in ``gateway/errors.py`` turns them into responses.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, render_template, request
from marshmallow import Schema, ValidationError

from gateway import directory
from gateway.audit import AUDIT, note
from gateway.auth import AUTH_CACHE, CITY_ADMIN, COMPANY, forbid, require_role
from gateway.companies import credit_code_refusal, with_first_token
from gateway.listing import (
    columns_of,
    csv_response,
    page,
    table,
    wants_csv,
)
from gateway.openapi import build_spec
from gateway.publicview import Body, PublicView, Snapshot
from gateway.schemas import (
    ApplicationQuerySchema,
    ApplicationRequestSchema,
    ApplicationResponseSchema,
    ApplicationSchema,
    AuditEntrySchema,
    AuditQuerySchema,
    CitySchema,
    DatacenterSchema,
    FormatQuerySchema,
    HourlyUsageSchema,
    PageQuerySchema,
    RedemptionLineSchema,
    RefusedWritesSchema,
    ReplayResultSchema,
    ReviewRequestSchema,
    RevokeRequestSchema,
    StatementEntrySchema,
    StatementSchema,
    SummarySchema,
    TenantUsageSchema,
    TokenQuerySchema,
    TokenSchema,
    UsageQuerySchema,
    VoucherQuerySchema,
    VoucherSchema,
)
from gateway.vouchers import check_holder, parse_code, voucher_city
from services.common.errors import InvalidRequest

api = Blueprint("api", __name__, url_prefix="/api/v1")

# The summary and the city pages are the same for everyone and are read by
# every dashboard: served from the PublicView in memory, replaced behind the
# readers once older than PUBLIC_CACHE_TTL_S (config key of the same name; 0
# asks the registry on every request).
PUBLIC_VIEW = "public_view"  # key in app.extensions
PUBLIC_CACHE_TTL_S = "PUBLIC_CACHE_TTL_S"


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


def make_public_view(app: Flask, rpc: Any, ttl_s: float) -> PublicView:
    """The registry's ``public_view``, rendered as this portal renders it."""

    def renderer(schema: Schema):
        def render(data: Any) -> bytes:
            text = app.json.dumps(schema.dump(data), separators=(",", ":"))
            return f"{text}\n".encode()

        return render

    return PublicView(
        load=lambda: rpc.call("city_registry", "public_view"),
        render_summary=renderer(SummarySchema()),
        render_city=renderer(CitySchema()),
        ttl_s=ttl_s,
    )


def _public_snapshot() -> Snapshot | None:
    """The snapshot to serve, or None when the cache is off."""
    if float(current_app.config.get(PUBLIC_CACHE_TTL_S, 1.0)) <= 0:
        return None
    return current_app.extensions[PUBLIC_VIEW].current()


def _public_response(body: Body):
    """Rendered bytes with an entity tag: a dashboard polling with
    ``If-None-Match`` gets 304 until the figures change."""
    if body.etag in request.if_none_match:
        response = current_app.response_class(status=304)
    else:
        response = current_app.response_class(body.data, mimetype="application/json")
    ttl = float(current_app.config.get(PUBLIC_CACHE_TTL_S, 1.0))
    response.headers["ETag"] = f'"{body.etag}"'
    response.headers["Cache-Control"] = f"public, max-age={max(1, round(ttl))}"
    return response


def _dump(schema: Schema, data: Any):
    return jsonify(schema.dump(data))


def _vouchers_service(city: str) -> str:
    return f"vouchers_{city}"


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_request", "the body must be a JSON object")
    return body


# -- public aggregates ------------------------------------------------------


@api.get("/network/summary")
def network_summary():
    snapshot = _public_snapshot()
    if snapshot is None:
        return _dump(SummarySchema(), _rpc("city_registry", "network_summary"))
    return _public_response(snapshot.summary)


@api.get("/cities")
def list_cities():
    query = FormatQuerySchema().load(request.args.to_dict())
    cities = _rpc("city_registry", "list_cities")
    return table(CitySchema(), cities, name="cities", query=query)


@api.get("/cities/<city>")
def get_city(city: str):
    snapshot = _public_snapshot()
    body = snapshot.cities.get(city) if snapshot is not None else None
    if body is not None:
        return _public_response(body)
    # Off, or a city admitted since the snapshot (or none at all): ask, when
    # the directory has it; a made-up code is 404 without an RPC of its own.
    if not directory.city_listed(city):
        raise directory.city_not_found(city)
    return _dump(CitySchema(), _rpc("city_registry", "get_city", city))


@api.get("/datacenters")
def list_datacenters():
    query = FormatQuerySchema().load(request.args.to_dict())
    datacenters = _rpc("city_registry", "list_datacenters")
    return table(DatacenterSchema(), datacenters, name="datacenters", query=query)


@api.get("/datacenters/<datacenter_id>")
def get_datacenter(datacenter_id: str):
    return _dump(
        DatacenterSchema(), _rpc("city_registry", "get_datacenter", datacenter_id)
    )


# -- vouchers ---------------------------------------------------------------


@api.post("/cities/<city>/applications")
def apply(city: str):
    """A company applies for itself (in any city), or the city's staff (or the
    ministry) on its behalf. The answer that issues the company's first
    voucher carries its portal token, once (gateway/companies.py)."""
    role = require_role()
    may_apply = role.is_national_admin or role.is_city_admin(city) or role.is_company()
    if not may_apply:
        raise forbid(f"only companies and {city}'s staff may apply to it")
    directory.known_city(city)
    try:
        application = ApplicationRequestSchema().load(_json_body())
    except ValidationError as err:
        raise credit_code_refusal(err) or err from None
    registration_id = application["company"]["registration_id"]
    if role.kind == COMPANY and not role.is_company(registration_id):
        raise forbid("a company may apply only for itself")
    # Dump again so that dates travel as ISO strings, as the contract says.
    payload = ApplicationRequestSchema().dump(application)
    decision = _rpc(_vouchers_service(city), "apply", payload)
    note(
        program_id=application["program_id"],
        company_id=registration_id,
        decision=decision.get("decision"),
        application_id=decision.get("application_id"),
        voucher_code=(decision.get("voucher") or {}).get("code"),
    )
    return _dump(ApplicationResponseSchema(), with_first_token(decision)), 201


@api.get("/vouchers/<code>")
def get_voucher(code: str):
    parse_code(code)  # 400 before the token is even checked
    role = require_role()
    code, city = voucher_city(code, role)
    voucher = _rpc(_vouchers_service(city), "get_voucher", code)
    check_holder(role, voucher, code)
    return _dump(VoucherSchema(), voucher)


def _voucher_page(code: str, method: str) -> tuple[dict, str, dict]:
    """``(query, code, answer)`` of a paged read of a voucher's city
    (``method``), for a caller who may see the voucher: the code checked by
    its check character, the caller by its role and the voucher's holder."""
    parse_code(code)
    role = require_role()
    query = PageQuerySchema().load(request.args.to_dict())
    code, city = voucher_city(code, role)
    answer = _rpc(
        _vouchers_service(city),
        method,
        code,
        limit=query["limit"],
        offset=query["offset"],
    )
    check_holder(role, answer["voucher"], code)
    return query, code, answer


@api.get("/vouchers/<code>/statement")
def voucher_statement(code: str):
    """Every ledger entry of a voucher: issue, each subsidised job, release."""
    query, code, statement = _voucher_page(code, "voucher_statement")
    limit, offset = query["limit"], query["offset"]
    if wants_csv(query):
        schema = StatementEntrySchema()
        return csv_response(
            schema.dump(statement["entries"], many=True),
            columns_of(schema),
            f"statement-{code}",
        )
    return _dump(StatementSchema(), statement | {"limit": limit, "offset": offset})


@api.get("/vouchers/<code>/redemptions")
def list_redemptions(code: str):
    """Every record billed to a voucher (booked, clawed back, refused), paged."""
    query, code, found = _voucher_page(code, "list_redemptions")
    limit, offset = query["limit"], query["offset"]
    return page(
        RedemptionLineSchema(),
        found["items"],
        total=found["total"],
        limit=limit,
        offset=offset,
        name=f"redemptions-{code}",
        query=query,
    )


@api.post("/vouchers/<code>/revoke")
def revoke_voucher(code: str):
    """City staff (or the ministry) revoke a voucher; its balance is released."""
    parse_code(code)
    role = require_role()
    code, city = voucher_city(code, role)
    if not (role.is_national_admin or role.is_city_admin(city)):
        raise forbid(f"only {city}'s staff may revoke its vouchers")
    body = RevokeRequestSchema().load(_json_body())
    voucher = _rpc(
        _vouchers_service(city), "revoke_voucher", code, body["reason"], str(role)
    )
    note(voucher_code=code, reason=body["reason"])
    return _dump(VoucherSchema(), voucher)


# -- a city's staff: applications and vouchers ---------------------------------


def _staff_city(city: str):
    """The caller, when it is ``city``'s staff or national; the city exists."""
    role = require_role()
    if not (role.is_national_admin or role.is_city_admin(city)):
        raise forbid(f"only {city}'s staff may see this")
    directory.known_city(city)
    return role


@api.get("/cities/<city>/applications")
def list_applications(city: str):
    """The city's applications; ``?status=pending_review`` is its review queue."""
    _staff_city(city)
    query = ApplicationQuerySchema().load(request.args.to_dict())
    found = _rpc(
        _vouchers_service(city),
        "list_applications",
        status=query.get("status"),
        limit=query["limit"],
        offset=query["offset"],
    )
    return page(
        ApplicationSchema(),
        found["items"],
        total=found["total"],
        limit=query["limit"],
        offset=query["offset"],
        name=f"applications-{city}",
        query=query,
    )


@api.post("/cities/<city>/applications/<application_id>/review")
def review_application(city: str, application_id: str):
    """Approve or reject an application the rules left for manual review."""
    role = _staff_city(city)
    body = ReviewRequestSchema().load(_json_body())
    reviewed = _rpc(
        _vouchers_service(city),
        "review_application",
        application_id,
        body["approve"],
        body["reason"],
        str(role),
    )
    voucher = reviewed.get("voucher") or {}
    note(
        approve=body["approve"],
        reason=body["reason"],
        decision=reviewed.get("decision"),
        voucher_code=voucher.get("code") or reviewed.get("voucher_code"),
    )
    return _dump(ApplicationSchema(), with_first_token(reviewed))


@api.get("/cities/<city>/vouchers")
def list_vouchers(city: str):
    """The city's vouchers; a company (of any city) sees only its own."""
    role = require_role()
    query = VoucherQuerySchema().load(request.args.to_dict())
    company_id = query.get("company_id")
    if role.kind == COMPANY:
        if company_id not in (None, role.company_id):
            raise forbid("a company sees only its own vouchers")
        company_id = role.company_id
    elif not (role.is_national_admin or role.is_city_admin(city)):
        raise forbid(f"only {city}'s staff and companies may list its vouchers")
    directory.known_city(city)
    found = _rpc(
        _vouchers_service(city),
        "list_vouchers",
        company_id=company_id,
        status=query.get("status"),
        limit=query["limit"],
        offset=query["offset"],
    )
    return page(
        VoucherSchema(exclude=("redemptions",)),
        found["items"],
        total=found["total"],
        limit=query["limit"],
        offset=query["offset"],
        name=f"vouchers-{city}",
        query=query,
    )


# -- a data centre's own stream ----------------------------------------------


def _own_datacenter(datacenter_id: str) -> None:
    role = require_role()
    if not (role.is_national_admin or role.is_datacenter(datacenter_id)):
        raise forbid("a data centre's usage is visible to it and the national admin")
    _rpc("city_registry", "get_datacenter", datacenter_id)  # datacenter_not_found


@api.get("/datacenters/<datacenter_id>/usage/tenants")
def usage_by_tenant(datacenter_id: str):
    """GPU-seconds and cost per tenant (and voucher) over the window."""
    _own_datacenter(datacenter_id)
    query = UsageQuerySchema().load(request.args.to_dict())
    rows = _rpc(
        "metering",
        "usage_by_tenant",
        datacenter_id,
        window_hours=query["window_hours"],
    )
    return table(
        TenantUsageSchema(), rows, name=f"usage-{datacenter_id}-tenants", query=query
    )


@api.get("/datacenters/<datacenter_id>/usage/hourly")
def usage_by_hour(datacenter_id: str):
    """GPU-seconds and cost per hour over the window (empty hours left out)."""
    _own_datacenter(datacenter_id)
    query = UsageQuerySchema().load(request.args.to_dict())
    rows = _rpc(
        "metering", "usage_by_hour", datacenter_id, window_hours=query["window_hours"]
    )
    return table(
        HourlyUsageSchema(), rows, name=f"usage-{datacenter_id}-hourly", query=query
    )


# -- data centres' rejected records (the listing: gateway/review_api.py) ----


@api.post("/dead-letters/<int:dead_letter_id>/replay")
def replay_dead_letter(dead_letter_id: int):
    """Run a dead letter through metering again (after its cause is fixed)."""
    role = require_role()
    if not role.is_national_admin:
        raise forbid("only the national admin may replay dead letters")
    result = _rpc("metering", "replay_dead_letter", dead_letter_id)
    note(outcome=result.get("outcome"), reason=result.get("reason"))
    return _dump(ReplayResultSchema(), result)


# -- the audit log ----------------------------------------------------------


@api.get("/audit")
def list_audit():
    """Who wrote what, when: all of it nationally, a city's own for its staff."""
    role = require_role()
    query = AuditQuerySchema().load(request.args.to_dict())
    if role.kind == CITY_ADMIN:
        if query.get("scope") not in (None, role.city):
            raise forbid("a city's staff see only their city's audit entries")
        query["scope"] = role.city
    elif not role.is_national_admin:
        raise forbid("the audit log is for the national admin and city staff")
    entries, total = current_app.extensions[AUDIT].entries(
        scope=query.get("scope"),
        actor=query.get("actor"),
        action=query.get("action"),
        limit=query["limit"],
        offset=query["offset"],
    )
    return page(
        AuditEntrySchema(),
        entries,
        total=total,
        limit=query["limit"],
        offset=query["offset"],
        name="audit",
        query=query,
    )


@api.get("/audit/anonymous")
def list_refused_writes():
    """Anonymous writes refused, counted per endpoint and status (national)."""
    if not require_role().is_national_admin:
        raise forbid("only the national admin reads the anonymous refusals")
    query = FormatQuerySchema().load(request.args.to_dict())
    counts = current_app.extensions[AUDIT].refused()
    return table(RefusedWritesSchema(), counts, name="audit-anonymous", query=query)


# -- portal tokens ------------------------------------------------------------


@api.get("/tokens")
def list_tokens():
    """Portal tokens by id: all of them (or one role's) for the national
    admin; any other principal, its own role's only."""
    role = require_role()
    query = TokenQuerySchema().load(request.args.to_dict())
    wanted = query.get("role")
    if not role.is_national_admin:
        if wanted not in (None, str(role)):
            raise forbid("a principal sees only its own role's tokens")
        wanted = str(role)
    found = _rpc(
        "city_registry",
        "list_tokens",
        role=wanted,
        limit=query["limit"],
        offset=query["offset"],
    )
    return page(
        TokenSchema(),
        found["items"],
        total=found["total"],
        limit=query["limit"],
        offset=query["offset"],
        name="tokens",
        query=query,
    )


@api.delete("/tokens/<token_id>")
def revoke_token(token_id: str):
    """Revoke one token: the national admin any, a principal its own role's
    (another's is 404, as if there were none)."""
    role = require_role()
    revoked = _rpc(
        "city_registry",
        "revoke_token",
        token_id,
        role=None if role.is_national_admin else str(role),
    )
    # This portal forgets every cached role at once: the revoked token is
    # refused here from now on (other portal processes: within 30 s).
    current_app.extensions[AUTH_CACHE].clear()
    note(token_id=token_id, token_role=revoked.get("role"))
    return _dump(TokenSchema(), revoked)


@api.get("/openapi.json")
def openapi_json():
    return jsonify(build_spec().to_dict())


@api.get("/docs")
def api_docs():
    """The OpenAPI document as a plain page: no script, no CDN."""
    return render_template("api_docs.html", spec=build_spec().to_dict())
