"""The agent API of CONTRACTS.md §6: what a data centre's agents talk to.

``create_app(settings, outbox)`` builds the Flask app; ``settings`` is the
process's loaded configuration. Every answer is JSON; errors are
``{"error", "message", "details"}``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from services.common import telemetry, vouchercode
from services.common.config import (
    AGENT_TOKEN,
    DATACENTER_ID,
    KEY_ID,
    MAX_BACKLOG,
)
from services.common.errors import (
    ComputenetError,
    Conflict,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
)
from services.common.units import format_ts, utcnow
from services.datacenter_gateway import domain
from services.datacenter_gateway.outbox import Conflict as OutboxConflict
from services.datacenter_gateway.outbox import Outbox
from services.datacenter_gateway.relay import RelayStatus

# One table: error class → HTTP status (STYLE.md principle 4).
STATUS_OF = {
    InvalidRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    Unavailable: 503,
}
RETRY_AFTER_S = 5
DEFAULT_MAX_BACKLOG = 1_000_000


def create_app(
    settings: Mapping[str, Any],
    outbox: Outbox,
    relay_status: RelayStatus | None = None,
    inventory: list[domain.InventoryItem] | None = None,
) -> Flask:
    """The agent API of one data centre, over ``outbox``.

    ``inventory`` (this data centre's GPUs) lets the gateway reject unknown GPU
    models at once; without it, metering judges them.
    """
    app = Flask(__name__)
    app.json.sort_keys = False
    datacenter_id = settings[DATACENTER_ID]
    key_id = settings.get(KEY_ID)
    token = settings.get(AGENT_TOKEN) or None
    max_backlog = int(settings.get(MAX_BACKLOG) or DEFAULT_MAX_BACKLOG)
    status = relay_status or RelayStatus()
    inventory = list(inventory or [])
    gpu_models = [item.gpu_model for item in inventory]
    app.extensions["computenet.outbox"] = outbox
    app.extensions["computenet.relay_status"] = status

    @app.before_request
    def authenticate():
        if token is None or not request.path.startswith("/v1/"):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), token.encode()
        ):
            raise Unauthorized(
                "unauthorized", "a valid 'Authorization: Bearer' token is required"
            )
        return None

    @app.post("/v1/usage")
    def post_usage():
        if outbox.backlog() > max_backlog:
            raise Unavailable(
                "backlog_full",
                f"more than {max_backlog} records await publishing; retry later",
                {"retry_after_s": RETRY_AFTER_S},
            )
        payload = _json_body()
        try:
            records, errors = domain.prepare_batch(payload, datacenter_id, gpu_models)
        except domain.InvalidBatch as exc:
            raise InvalidRequest("invalid_request", str(exc)) from exc
        if errors:
            raise InvalidRequest(
                "invalid_records",
                f"{len(errors)} of {len(payload)} records are invalid; none was stored",
                errors,
            )
        with telemetry.tracer.start_as_current_span(
            "datacenter_gateway.ingest"
        ) as span:
            span.set_attribute("computenet.records", len(records))
            carrier = telemetry.inject({})
            result = outbox.ingest(records, datacenter_id, carrier.get("traceparent"))
        if isinstance(result, OutboxConflict):
            raise Conflict(
                "conflicting_record",
                "a record_id was accepted before with another body; none was stored",
                result.indexes,
            )
        return jsonify(accepted=result.accepted, duplicates=result.duplicates), 202

    @app.put("/v1/tenants/<tenant_id>/voucher")
    def put_voucher(tenant_id: str):
        _check_tenant(tenant_id)
        payload = _json_body()
        code = payload.get("voucher_code") if isinstance(payload, dict) else None
        try:
            code = domain.normalise_voucher_code(code)
        except vouchercode.InvalidVoucherCode as exc:
            raise InvalidRequest(
                "invalid_voucher_code", str(exc), {"voucher_code": [str(exc)]}
            ) from exc
        outbox.set_voucher(tenant_id, code)
        return jsonify(tenant_id=tenant_id, voucher_code=code)

    @app.get("/v1/tenants/<tenant_id>/voucher")
    def get_voucher(tenant_id: str):
        code = outbox.get_voucher(tenant_id)
        if code is None:
            raise NotFound(
                "voucher_not_found", f"tenant {tenant_id!r} handed over no voucher"
            )
        return jsonify(tenant_id=tenant_id, voucher_code=code)

    @app.delete("/v1/tenants/<tenant_id>/voucher")
    def delete_voucher(tenant_id: str):
        outbox.clear_voucher(tenant_id)
        return "", 204

    @app.get("/v1/status")
    def get_status():
        oldest = outbox.oldest_unsent_at()
        now = utcnow()
        with status.lock:
            reachable = status.broker_reachable
            last_confirm = status.last_confirm_at
            published = status.published_total
            last_error = status.last_error
        return jsonify(
            datacenter_id=datacenter_id,
            key_id=key_id,
            backlog=outbox.backlog(fresh=True),
            oldest_unsent_age_s=(
                round((now - oldest).total_seconds(), 3) if oldest else None
            ),
            last_confirm_at=format_ts(last_confirm) if last_confirm else None,
            broker_reachable=reachable,
            published_total=published,
            # Extensions: why the broker is unreachable, and what agents may
            # report (the simulator picks its GPU models from here).
            last_error=last_error,
            inventory=[{"gpu_model": i.gpu_model, "count": i.count} for i in inventory],
        )

    @app.errorhandler(ComputenetError)
    def computenet_error(exc: ComputenetError):
        response = jsonify(error=exc.code, message=exc.message, details=exc.details)
        response.status_code = next(
            (code for cls, code in STATUS_OF.items() if isinstance(exc, cls)), 500
        )
        if response.status_code == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        response = jsonify(
            error=(exc.name or "error").lower().replace(" ", "_"),
            message=exc.description or "",
            details={},
        )
        response.status_code = exc.code or 500
        return response

    return app


def _json_body() -> Any:
    payload = request.get_json(force=True, silent=True)
    if payload is None:
        raise InvalidRequest(
            "invalid_request", "the body must be JSON (application/json)"
        )
    return payload


def _check_tenant(tenant_id: str) -> None:
    if not 1 <= len(tenant_id) <= 128:
        raise InvalidRequest("invalid_tenant_id", "tenant_id must be 1–128 characters")
