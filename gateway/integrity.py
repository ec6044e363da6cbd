"""The integrity view (issue 15, DESIGN.md §9): how much of what each data
centre claims is refused or held, and what waits in each city's review queue.

``GET /api/v1/integrity`` and the dashboard's ``/integrity``
(``gateway/dashboard.py``) show, per data centre and over the last 24 h and
7 days, the records it sent (those metering
rated plus those it set aside), the share refused and the share held, and
each reason's count and share, from two sources side by side: metering's
dead letters (``integrity_counts``) and the cities' refusals and holds (the
registry's copy, ``city_refusal_counts``). A city's refusal concerns a
record metering rated, so it is counted in that record's share, not added
to the denominator again.

Who sees what: the ministry every data centre and every queue; a city's
staff every data centre (they pay them) and their own queue; a data centre
its own row only. A company sees nothing here: its refused records are on
its voucher's redemptions.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, current_app, jsonify
from marshmallow import Schema, fields

from gateway.auth import CITY_ADMIN, DATACENTER, Role, forbid, require_role
from gateway.review_api import _err, _ok
from services.common.contracts import UtcTimestamp
from services.common.units import format_ts, utcnow

integrity_api = Blueprint("integrity_api", __name__, url_prefix="/api/v1")

# The windows, as metering's figures name them.
WINDOWS = {"24h": 24, "7d": 24 * 7}
METERING, CITY = "metering", "city"


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


def _share(count: int, of: int) -> float | None:
    return round(count / of, 6) if of else None


def datacenter_rows(
    metering: dict[str, dict[str, Any]],
    city: dict[str, list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """One row per data centre: ``metering`` as ``integrity_counts`` answers,
    ``city`` each window's ``city_refusal_counts``."""
    by_dc: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, counts in city.items():
        for count in counts:
            by_dc.setdefault(count["datacenter_id"], {}).setdefault(label, []).append(
                count
            )
    rows = []
    for dc in sorted(set(metering) | set(by_dc)):
        row: dict[str, Any] = {"datacenter_id": dc}
        for label in WINDOWS:
            seen = metering.get(dc, {}).get(label) or {"records": 0, "dead_letters": {}}
            reasons = [
                {"source": METERING, "kind": "refused", "reason": r, "count": n}
                for r, n in sorted(seen["dead_letters"].items())
            ] + [
                {
                    "source": CITY,
                    "kind": c["kind"],
                    "reason": c["reason"],
                    "count": c["count"],
                }
                for c in by_dc.get(dc, {}).get(label, [])
            ]
            sent = seen["records"] + sum(seen["dead_letters"].values())
            refused = sum(r["count"] for r in reasons if r["kind"] == "refused")
            held = sum(r["count"] for r in reasons if r["kind"] == "held")
            for reason in reasons:
                reason["share"] = _share(reason["count"], sent)
            row[label] = {
                "records": sent,
                "refused": refused,
                "held": held,
                "refused_share": _share(refused, sent),
                "held_share": _share(held, sent),
                "reasons": reasons,
            }
        rows.append(row)
    return rows


def integrity_view(role: Role) -> dict[str, Any]:
    """The view ``role`` may see (see the module's docstring)."""
    if not (role.is_national_admin or role.kind in (CITY_ADMIN, DATACENTER)):
        raise forbid("the integrity view is for the ministry, cities and data centres")
    now = utcnow()
    own_dc = role.datacenter_id if role.kind == DATACENTER else None
    metering = _rpc("metering", "integrity_counts")
    city = {
        label: _rpc(
            "city_registry",
            "city_refusal_counts",
            format_ts(now - timedelta(hours=hours)),
            datacenter_id=own_dc,
        )
        for label, hours in WINDOWS.items()
    }
    if own_dc is not None:
        metering = {own_dc: metering[own_dc]} if own_dc in metering else {}
    queues: list[dict[str, Any]] = []
    if role.is_national_admin:
        queues = _rpc("city_registry", "review_queues")
    elif role.kind == CITY_ADMIN:
        queues = _rpc("city_registry", "review_queues", city=role.city)
    return {
        "generated_at": format_ts(now),
        "windows": list(WINDOWS),
        "datacenters": datacenter_rows(metering, city),
        "review_queues": queues,
    }


@integrity_api.get("/integrity")
def get_integrity():
    """Refused and held shares per data centre; the cities' review queues."""
    return jsonify(IntegritySchema().dump(integrity_view(require_role())))


# -- schemas and OpenAPI -----------------------------------------------------


class ReasonCountSchema(Schema):
    source = fields.String(metadata={"description": "metering or city"})
    kind = fields.String(metadata={"description": "refused or held"})
    reason = fields.String()
    count = fields.Integer()
    share = fields.Float(allow_none=True)


class IntegrityWindowSchema(Schema):
    records = fields.Integer(metadata={"description": "rated + dead letters"})
    refused = fields.Integer()
    held = fields.Integer()
    refused_share = fields.Float(allow_none=True)
    held_share = fields.Float(allow_none=True)
    reasons = fields.List(fields.Nested(ReasonCountSchema))


class IntegrityRowSchema(Schema):
    datacenter_id = fields.String()
    last_24h = fields.Nested(IntegrityWindowSchema, data_key="24h", attribute="24h")
    last_7d = fields.Nested(IntegrityWindowSchema, data_key="7d", attribute="7d")


class ReviewQueueSchema(Schema):
    city = fields.String()
    waiting = fields.Integer()
    subsidy_fen = fields.Integer(metadata={"description": "what release would pay"})
    oldest_held_at = UtcTimestamp(allow_none=True)


class IntegritySchema(Schema):
    generated_at = fields.String()
    windows = fields.List(fields.String())
    datacenters = fields.List(fields.Nested(IntegrityRowSchema))
    review_queues = fields.List(fields.Nested(ReviewQueueSchema))


# Its nested schemas are registered by apispec under their own names.
OPENAPI_SCHEMAS = {"Integrity": IntegritySchema}

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/integrity": {
        "get": {
            "summary": "Refused and held shares per data centre over 24 h and 7 d, "
            "and the review queues (national: all; city staff: every data centre "
            "and their queue; a data centre: its own row)",
            "security": [{"bearer": []}],
            "responses": {
                "200": _ok("the integrity view", "Integrity"),
                **_err(401, 403),
            },
        }
    },
}
