"""Events a consumer set aside (issue 16, bounded retries):
``GET /api/v1/parked-events`` lists them, newest first, paged (``kind``:
``rejected`` on arrival, or ``failed`` after ``MAX_DELIVERY_ATTEMPTS``), and
``POST /api/v1/parked-events/<id>/replay`` applies one again once its cause
is fixed.

``service`` says whose: ``registry`` (the default, so that clients written
before it keep working: its federation events), ``metering`` (usage,
capacity and binding messages that passed every check but failed to apply)
or a city code (its usage queue's ``usage_rated``, ``binding_requested``,
``usage_hold``). Ids are per service. The registry's and metering's are the
ministry's alone (an event there may be any city's, any data centre's); a
city's are its own admin's and the ministry's."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request
from marshmallow import Schema, fields, validate

from gateway import directory
from gateway.audit import note
from gateway.auth import forbid, require_role
from gateway.listing import page
from gateway.review_api import _err, _ok, _page_of, _param
from gateway.schemas import PageQuerySchema
from services.common.contracts import UtcTimestamp

parked = Blueprint("parked", __name__, url_prefix="/api/v1")


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


REGISTRY, METERING = "registry", "metering"
_NATIONAL_SERVICES = {REGISTRY: "city_registry", METERING: "metering"}


def _service(name: str) -> str:
    """The RPC service behind ``service=``, once the caller may ask it."""
    role = require_role()
    if name in _NATIONAL_SERVICES:
        if not role.is_national_admin:
            raise forbid(f"{name}'s parked events are the national admin's")
        return _NATIONAL_SERVICES[name]
    if not (role.is_national_admin or role.is_city_admin(name)):
        raise forbid(
            f"only {name}'s admin and the national admin see its parked events"
        )
    directory.known_city(name)  # a city code, of a city that serves RPC
    return f"vouchers_{name}"


class ServiceQuerySchema(Schema):
    service = fields.String(
        load_default=REGISTRY,
        validate=validate.Length(min=1, max=64),
        metadata={"description": "registry (default) | metering | a city code"},
    )


class ParkedQuerySchema(PageQuerySchema, ServiceQuerySchema):
    kind = fields.String(validate=validate.OneOf(("rejected", "failed")))


class ParkedEventSchema(Schema):
    id = fields.Integer()
    service = fields.String(metadata={"description": "registry | metering | city"})
    routing_key = fields.String()
    event_id = fields.String(allow_none=True)
    kind = fields.String(metadata={"description": "rejected | failed"})
    reason = fields.String()
    attempts = fields.Integer()
    parked_at = UtcTimestamp()
    replayed_at = UtcTimestamp(allow_none=True)
    outcome = fields.String(
        allow_none=True, metadata={"description": "applied|duplicate|parked_again"}
    )


class ParkedReplaySchema(Schema):
    id = fields.Integer()
    outcome = fields.String()
    reason = fields.String(allow_none=True)


@parked.get("/parked-events")
def list_parked_events():
    query = ParkedQuerySchema().load(request.args.to_dict())
    service = _service(query["service"])
    found = _rpc(
        service,
        "list_parked_events",
        kind=query.get("kind"),
        limit=query["limit"],
        offset=query["offset"],
    )
    items = [{**item, "service": query["service"]} for item in found["items"]]
    return page(
        ParkedEventSchema(),
        items,
        total=found["total"],
        limit=query["limit"],
        offset=query["offset"],
        name="parked-events",
        query=query,
    )


@parked.post("/parked-events/<int:parked_id>/replay")
def replay_parked_event(parked_id: int):
    query = ServiceQuerySchema().load(request.args.to_dict())
    service = _service(query["service"])
    result = _rpc(service, "replay_parked_event", parked_id)
    note(parked_id=parked_id, service=query["service"], outcome=result["outcome"])
    return jsonify(ParkedReplaySchema().dump(result))


OPENAPI_SCHEMAS = {"ParkedEvent": ParkedEventSchema, "ParkedReplay": ParkedReplaySchema}

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/parked-events": {
        "get": {
            "summary": "Events a consumer set aside, newest first: the "
            "registry's (default) and metering's for the national admin, a "
            "city's (service=<city>) for its admin too",
            "security": [{"bearer": []}],
            "parameters": [{"in": "query", "schema": ParkedQuerySchema}],
            "responses": {
                "200": _page_of("ParkedEvent", "parked events"),
                **_err(400, 401, 403, 404),
            },
        }
    },
    "/api/v1/parked-events/{parked_id}/replay": {
        "post": {
            "summary": "Apply a parked event again, once its cause is fixed "
            "(who may list them)",
            "security": [{"bearer": []}],
            "parameters": [
                _param("parked_id", "integer"),
                {"in": "query", "schema": ServiceQuerySchema},
            ],
            "responses": {
                "200": _ok("what the replay came to", "ParkedReplay"),
                **_err(400, 401, 403, 404, 409),
            },
        }
    },
}
