"""The agent API of CONTRACTS.md §6: what a data centre's agents talk to.

``create_app(settings, outbox)`` builds the Flask app; ``settings`` is the
process's loaded configuration. Every answer is JSON; errors are
``{"error", "message", "details"}``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from datetime import UTC, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from services.common import telemetry, vouchercode
from services.common.config import (
    AGENT_TOKEN,
    DATACENTER_ID,
    GPU_MODEL_NAMES,
    KEY_ID,
    MAX_BACKLOG,
    MAX_CONTENT_LENGTH,
    NEXT_KEY_ID,
    NVIDIA_TENANTS,
    SAMPLE_INTERVAL_S,
    SLURM_ACCOUNTS,
    SLURM_TENANT_FIELD,
    SLURM_TIMEZONE,
)
from services.common.errors import (
    ComputenetError,
    Conflict,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
)
from services.common.http_errors import classify, error_body, row_of, status_of
from services.common.http_limits import limit_body_size
from services.common.units import format_ts, utcnow
from services.datacenter_gateway import domain, parsers
from services.datacenter_gateway.outbox import Conflict as OutboxConflict
from services.datacenter_gateway.outbox import Outbox
from services.datacenter_gateway.relay import RelayStatus

RETRY_AFTER_S = 5
DEFAULT_MAX_BACKLOG = 1_000_000
# The largest legitimate body is a batch of domain.MAX_BATCH (10 000) records:
# about 9.3 MiB with every field at its longest (a 128-character job_id), less
# than 3 MiB as agents send them. 32 MiB leaves room for indented JSON and for
# sacct output whose job steps and unfinished jobs are lines but not records.
DEFAULT_MAX_CONTENT_LENGTH = 32 * 1024 * 1024


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
    # During a rotation the relay switches to NEXT_KEY_ID (at NEXT_KEY_FROM).
    next_key_id = settings.get(NEXT_KEY_ID) or None
    key_id = settings.get(KEY_ID)
    token = settings.get(AGENT_TOKEN) or None
    max_backlog = int(settings.get(MAX_BACKLOG) or DEFAULT_MAX_BACKLOG)
    status = relay_status or RelayStatus()
    inventory = list(inventory or [])
    gpu_models = [item.gpu_model for item in inventory]
    app.extensions["computenet.outbox"] = outbox
    app.extensions["computenet.relay_status"] = status
    # First of the hooks: an oversized body is refused before authentication.
    limit_body_size(
        app, int(settings.get(MAX_CONTENT_LENGTH) or DEFAULT_MAX_CONTENT_LENGTH)
    )

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

    def check_backlog() -> None:
        if outbox.backlog() > max_backlog:
            raise Unavailable(
                "backlog_full",
                f"more than {max_backlog} records await publishing; retry later",
                {"retry_after_s": RETRY_AFTER_S},
            )

    def store(payload: Any, keep_first: bool = False, lines=None):
        """Validate and store agent records, all or nothing; the 202 body."""
        try:
            records, errors = domain.prepare_batch(payload, datacenter_id, gpu_models)
        except domain.InvalidBatch as exc:
            raise InvalidRequest("invalid_request", str(exc)) from exc
        if errors:
            if lines is not None:  # parsed input: name the lines, not indexes
                errors = {f"line {lines[int(i)]}": e for i, e in errors.items()}
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
            result = outbox.ingest(
                records,
                datacenter_id,
                carrier.get("traceparent"),
                keep_first=keep_first,
            )
        if isinstance(result, OutboxConflict):
            details = result.indexes
            if lines is not None:
                details = {f"line {lines[int(i)]}": e for i, e in details.items()}
            raise Conflict(
                "conflicting_record",
                "a record_id was accepted before with another body; none was stored",
                details,
            )
        return {"accepted": result.accepted, "duplicates": result.duplicates}

    def store_parsed(result: parsers.ParseResult, keep_first: bool = False):
        if result.errors:
            raise InvalidRequest(
                "unreadable_input",
                f"{len(result.errors)} line(s) cannot be read; nothing was stored",
                {"lines": result.errors},
            )
        stored = (
            store(result.records, keep_first, result.lines)
            if result.records
            else {
                "accepted": 0,
                "duplicates": 0,
            }
        )
        return jsonify(**stored, **result.summary()), 202

    @app.post("/v1/usage")
    def post_usage():
        check_backlog()
        return jsonify(**store(_json_body())), 202

    @app.post("/v1/usage/slurm")
    def post_slurm():
        check_backlog()
        args = request.args
        columns = args.get("columns")
        result = parsers.parse_sacct(
            _text_body(),
            tz=_timezone(args.get("tz") or settings.get(SLURM_TIMEZONE)),
            delimiter=args.get("delimiter") or "|",
            columns=columns.split(",") if columns else None,
            tenant_field=args.get("tenant_field")
            or settings.get(SLURM_TENANT_FIELD)
            or "Account",
            tenants=settings.get(SLURM_ACCOUNTS) or {},
            gpu_models=model_names(args.get("gpu_model")),
        )
        return store_parsed(result)

    @app.post("/v1/usage/nvidia-smi")
    def post_nvidia_smi():
        check_backlog()
        args = request.args
        text = _text_body()
        tenant_of = parsers.tenant_lookup(
            settings.get(NVIDIA_TENANTS) or {}, args.get("tenant") or None
        )
        tz = _timezone(args.get("tz") or settings.get(SLURM_TIMEZONE))
        first = text.lstrip().split("\n", 1)[0]
        if "utilization.gpu" in first and "pid" not in first:
            interval = args.get("interval_s") or settings.get(SAMPLE_INTERVAL_S)
            if not interval or not str(interval).isdigit() or int(interval) < 1:
                raise InvalidRequest(
                    "invalid_request",
                    "--query-gpu samples need ?interval_s=<seconds between samples>",
                )
            result = parsers.parse_gpu_samples(
                text,
                interval_s=int(interval),
                tenant_of=tenant_of,
                tz=tz,
                gpu_models=model_names(args.get("gpu_model")),
            )
        else:
            result = parsers.parse_accounted_apps(
                text, tenant_of=tenant_of, tz=tz, gpu_models=model_names(None)
            )
        # A process seen again by a later query has another timestamp but is
        # the same fact: the first observation stands.
        return store_parsed(result, keep_first=True)

    def model_names(default: str | None) -> parsers.GpuModels:
        return parsers.GpuModels(
            settings.get(GPU_MODEL_NAMES) or {}, gpu_models, default=default
        )

    @app.put("/v1/tenants/<tenant_id>/voucher")
    def put_voucher(tenant_id: str):
        """Hand the voucher over and ask its holder (CONTRACTS.md §6): the
        records it then carries are subsidised only once the holder has
        authorised this tenant here, on the portal."""
        _check_tenant(tenant_id)
        payload = _json_body()
        code = payload.get("voucher_code") if isinstance(payload, dict) else None
        try:
            code = domain.normalise_voucher_code(code)
        except vouchercode.InvalidVoucherCode as exc:
            raise InvalidRequest(
                "invalid_voucher_code", str(exc), {"voucher_code": [str(exc)]}
            ) from exc
        asked = outbox.set_voucher(tenant_id, code, datacenter_id, _traceparent())
        return jsonify(
            tenant_id=tenant_id,
            voucher_code=code,
            status="requested",
            request_id=asked.request_id,
            requested_at=format_ts(asked.requested_at),
        )

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
        """End the hand-over; its request is cancelled with the city."""
        outbox.clear_voucher(tenant_id, datacenter_id, _traceparent())
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
            next_key_id=next_key_id,
            backlog=outbox.backlog(fresh=True),
            # extension: binding requests not yet published
            binding_backlog=outbox.binding_backlog(),
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
        # The portal's table (STYLE.md principle 4): one status per class.
        response.status_code = status_of(exc)
        if response.status_code == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if row_of(exc) is not None:  # 413: named by the table, as the portal
            status_code, code, message, details = classify(exc)
            response = jsonify(error_body(code, message, details))
            response.status_code = status_code
            return response
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


def _traceparent() -> str | None:
    """The trace of this request, continued by the relay's publish."""
    return telemetry.inject({}).get("traceparent")


def _text_body() -> str:
    try:
        return request.get_data(cache=False).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            "invalid_request", f"the body is not UTF-8: {exc}"
        ) from exc


def _timezone(name: str | None) -> tzinfo:
    """Slurm and nvidia-smi print the host's local time: say which zone it is."""
    if not name or name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidRequest("invalid_request", f"unknown time zone {name!r}") from exc


def _check_tenant(tenant_id: str) -> None:
    if not 1 <= len(tenant_id) <= 128:
        raise InvalidRequest("invalid_tenant_id", "tenant_id must be 1–128 characters")
