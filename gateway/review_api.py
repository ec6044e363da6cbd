"""Dead letters from everywhere, the review queue and clawbacks (issue 15).

``GET /api/v1/dead-letters`` lists metering's dead letters and the cities'
refusals (the registry's copy of each ``usage_refused``) in one page, newest
first, each with its ``source``: ``metering`` or the refusing city. A city's
refusal has the id ``city:<n>`` and is replayed at the same place as a dead
letter, ``POST /api/v1/dead-letters/city:<n>/replay``: metering sends the
stored rated record to the city again with ``replay: true``, and the city
decides it again. The review queue is each city's (``vouchers_<city>``):
held records with their evidence, released or refused by its staff or the
ministry, and booked subsidies clawed back.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request

from gateway import directory
from gateway.audit import note
from gateway.auth import forbid, require_role
from gateway.listing import page
from gateway.review_schemas import (
    ClawbackRequestSchema,
    ClawbackSchema,
    DeadLettersQuerySchema,
    DecisionRequestSchema,
    HeldQuerySchema,
    HeldUsageSchema,
    MergedDeadLetterSchema,
    RefusalReplaySchema,
)
from gateway.vouchers import parse_code, voucher_city
from services.common.errors import InvalidRequest

review = Blueprint("review", __name__, url_prefix="/api/v1")

METERING = "metering"
CITY_ID_PREFIX = "city:"
# What one source is asked for at most (metering's own cap, the registry's).
MAX_ROWS = 1000


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_request", "the body must be a JSON object")
    return body


# -- dead letters: metering's and the cities' --------------------------------


def _from_metering(letter: dict[str, Any]) -> dict[str, Any]:
    return {
        **letter,
        "source": METERING,
        "replay_url": f"/api/v1/dead-letters/{letter['id']}/replay",
    }


def _from_city(refusal: dict[str, Any]) -> dict[str, Any]:
    ident = f"{CITY_ID_PREFIX}{refusal['id']}"
    return {
        "id": ident,
        "source": refusal["city"],
        "datacenter_id": refusal["datacenter_id"],
        "record_id": refusal["record_id"],
        "voucher_code": refusal["voucher_code"],
        "routing_key": f"{refusal['city']}.usage_refused",
        "reason": refusal["reason"],
        "detail": refusal["detail"],
        "received_at": refusal["refused_at"],
        "replayed_at": refusal["replayed_at"],
        "replay_outcome": refusal["replay_outcome"],
        "replay_reason": None,
        "replay_url": f"/api/v1/dead-letters/{ident}/replay",
    }


@review.get("/dead-letters")
def list_dead_letters():
    """Rejected records with reasons, from metering and from the cities:
    the national admin's, or a data centre's own."""
    role = require_role()
    if not (role.is_national_admin or role.is_datacenter()):
        raise forbid("dead letters are visible to the national admin and data centres")
    query = DeadLettersQuerySchema().load(request.args.to_dict())
    if role.is_datacenter():
        wanted = query.get("datacenter_id")
        if wanted is not None and wanted != role.datacenter_id:
            raise forbid("a data centre sees only its own dead letters")
        query["datacenter_id"] = role.datacenter_id
    limit, offset = query["limit"], query["offset"]
    source = query.get("source")
    # Each source newest first; one more than this page needs from each, so
    # that the merged page is right and its total known when it is the last.
    wanted_rows = min(offset + limit + 1, MAX_ROWS)
    letters, metering_total = [], 0
    if source in (None, METERING):
        letters = _rpc(
            "metering",
            "list_dead_letters",
            datacenter_id=query.get("datacenter_id"),
            reason=query.get("reason"),
            limit=wanted_rows,
        )
        metering_total = len(letters) if len(letters) < wanted_rows else None
    refusals, city_total = [], 0
    if source != METERING:
        found = _rpc(
            "city_registry",
            "list_city_refusals",
            datacenter_id=query.get("datacenter_id"),
            city=source,
            reason=query.get("reason"),
            limit=wanted_rows,
            offset=0,
        )
        refusals, city_total = found["items"], found["total"]
    merged = sorted(
        [*map(_from_metering, letters), *map(_from_city, refusals)],
        key=lambda item: item.get("received_at") or "",
        reverse=True,
    )
    total = None if metering_total is None else metering_total + city_total
    return page(
        MergedDeadLetterSchema(),
        merged[offset : offset + limit],
        total=total,
        limit=limit,
        offset=offset,
        name="dead-letters",
        query=query,
    )


@review.post("/dead-letters/city:<int:refusal_id>/replay")
def replay_refusal(refusal_id: int):
    """Replay a city's refusal (national admin): metering re-sends the rated
    record, ``replay: true``; the city forgets the refusal and decides again.
    ``replay_outcome`` on the listing follows what the city decides."""
    if not require_role().is_national_admin:
        raise forbid("only the national admin may replay dead letters")
    refusal = _rpc("city_registry", "get_city_refusal", refusal_id)
    sent = _rpc(
        "metering", "replay_rated", refusal["datacenter_id"], refusal["record_id"]
    )
    marked = _rpc("city_registry", "mark_refusal_replayed", refusal_id)
    note(
        source=refusal["city"],
        datacenter_id=refusal["datacenter_id"],
        record_id=refusal["record_id"],
        reason=refusal["reason"],
    )
    return jsonify(
        RefusalReplaySchema().dump(
            {
                "outcome": "replayed",
                "reason": None,
                "event_id": sent.get("event_id"),
                "dead_letter": _from_city(marked),
            }
        )
    )


# -- a city's review queue ---------------------------------------------------


def _staff_of(city: str):
    role = require_role()
    if not (role.is_national_admin or role.is_city_admin(city)):
        raise forbid(f"only {city}'s staff and the national admin review its usage")
    directory.known_city(city)
    return role


@review.get("/cities/<city>/held")
def list_held(city: str):
    """The city's held records (``status``: held by default), with evidence."""
    _staff_of(city)
    query = HeldQuerySchema().load(request.args.to_dict())
    found = _rpc(
        f"vouchers_{city}",
        "list_held",
        status=query["status"] if query["status"] != "all" else None,
        limit=query["limit"],
        offset=query["offset"],
    )
    return page(
        HeldUsageSchema(),
        found["items"],
        total=found["total"],
        limit=query["limit"],
        offset=query["offset"],
        name=f"held-{city}",
        query=query,
    )


@review.post("/cities/<city>/held/<datacenter_id>/<record_id>/decision")
def decide_held(city: str, datacenter_id: str, record_id: str):
    """Release (book, if the voucher still can) or refuse a held record."""
    role = _staff_of(city)
    body = DecisionRequestSchema().load(_json_body())
    decided = _rpc(
        f"vouchers_{city}",
        "decide_held",
        datacenter_id,
        record_id,
        body["decision"],
        body["reason"],
        str(role),
    )
    note(
        datacenter_id=datacenter_id,
        record_id=record_id,
        decision=body["decision"],
        status=decided.get("status"),
        reason=body["reason"],
    )
    return jsonify(HeldUsageSchema().dump(decided))


@review.post("/vouchers/<code>/clawbacks")
def claw_back(code: str):
    """Take back a subsidy booked on the voucher (its city's staff, national)."""
    parse_code(code)
    role = require_role()
    code, city = voucher_city(code, role)
    if not (role.is_national_admin or role.is_city_admin(city)):
        raise forbid(f"only {city}'s staff may claw back its subsidies")
    body = ClawbackRequestSchema().load(_json_body())
    result = _rpc(
        f"vouchers_{city}",
        "claw_back",
        body["datacenter_id"],
        body["record_id"],
        body["reason"],
        str(role),
        voucher_code=code,
    )
    note(
        voucher_code=code,
        datacenter_id=body["datacenter_id"],
        record_id=body["record_id"],
        clawed_back_fen=result.get("clawed_back_fen"),
        reason=body["reason"],
    )
    return jsonify(ClawbackSchema().dump(result)), 201


# -- OpenAPI -----------------------------------------------------------------


def _ok(description: str, schema: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _err(*statuses: int) -> dict[str, Any]:
    return {str(status): _ok("error", "Error") for status in (*statuses, 503)}


def _param(name: str, kind: str = "string") -> dict[str, Any]:
    return {"in": "path", "name": name, "required": True, "schema": {"type": kind}}


def _body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": schema}},
    }


def _page_of(schema: str, description: str) -> dict[str, Any]:
    """A 200 of one page of a collection, JSON or CSV (as ``gateway/openapi``'s)."""
    page_schema = {
        "type": "object",
        "required": ["items", "total", "limit", "offset"],
        "properties": {
            "items": {
                "type": "array",
                "items": {"$ref": f"#/components/schemas/{schema}"},
            },
            "total": {"type": "integer", "nullable": True},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
        },
    }
    response = _ok(description, page_schema)
    response["content"]["text/csv"] = {"schema": {"type": "string"}}
    return response


_AUTH = [{"bearer": []}]

OPENAPI_SCHEMAS = {
    "MergedDeadLetter": MergedDeadLetterSchema,
    "RefusalReplay": RefusalReplaySchema,
    "HeldUsage": HeldUsageSchema,
    "DecisionRequest": DecisionRequestSchema,
    "ClawbackRequest": ClawbackRequestSchema,
    "Clawback": ClawbackSchema,
}

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/dead-letters": {
        "get": {
            "summary": "Rejected usage records, metering's and the cities' "
            "(source), newest first: national admin, or a data centre's own",
            "security": _AUTH,
            "parameters": [{"in": "query", "schema": DeadLettersQuerySchema}],
            "responses": {
                "200": _page_of("MergedDeadLetter", "dead letters"),
                **_err(400, 401, 403),
            },
        }
    },
    "/api/v1/dead-letters/city:{refusal_id}/replay": {
        "post": {
            "summary": "Replay a city's refusal (national admin): metering sends "
            "the rated record again, replay: true; the city decides it again",
            "security": _AUTH,
            "parameters": [_param("refusal_id", "integer")],
            "responses": {
                "200": _ok(
                    "sent; the listing's replay_outcome follows", "RefusalReplay"
                ),
                **_err(401, 403, 404, 409),
            },
        }
    },
    "/api/v1/cities/{city}/held": {
        "get": {
            "summary": "The city's review queue: held records with their evidence "
            "(its staff, national admin)",
            "security": _AUTH,
            "parameters": [_param("city"), {"in": "query", "schema": HeldQuerySchema}],
            "responses": {
                "200": _page_of("HeldUsage", "held records"),
                **_err(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/cities/{city}/held/{datacenter_id}/{record_id}/decision": {
        "post": {
            "summary": "Release (book, if the voucher still can) or refuse a held "
            "record, once (its city's staff, national admin)",
            "security": _AUTH,
            "parameters": [
                _param("city"),
                _param("datacenter_id"),
                _param("record_id"),
            ],
            "requestBody": _body("DecisionRequest"),
            "responses": {
                "200": _ok("the record, decided", "HeldUsage"),
                **_err(400, 401, 403, 404, 409),
            },
        }
    },
    "/api/v1/vouchers/{code}/clawbacks": {
        "post": {
            "summary": "Claw back a booked subsidy by reversing entries (its "
            "city's staff, national admin)",
            "security": _AUTH,
            "parameters": [_param("code")],
            "requestBody": _body("ClawbackRequest"),
            "responses": {
                "201": _ok("what was taken back", "Clawback"),
                **_err(400, 401, 403, 404, 409),
            },
        }
    },
}
