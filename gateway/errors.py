"""The portal's one error table: exception type → HTTP status and error code.

Every error leaves the portal as ``{"error": CODE, "message": text,
"details": {...}}`` (CONTRACTS.md §7). Services raise the classes of
``services.common.errors``, which cross RPC as themselves and keep their own
``code``; everything else is mapped here, by the first row whose class the
exception is an instance of. Anything not in the table is a 500
``internal_error`` whose text stays in the log, never in the response.
"""

from __future__ import annotations

import logging
import queue
import re
from typing import Any

import amqp.exceptions
import kombu.exceptions
from flask import Flask, Response, jsonify
from marshmallow import ValidationError
from nameko.exceptions import RpcTimeout, UnknownService
from werkzeug.exceptions import HTTPException

from services.common.errors import (
    ComputenetError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger(__name__)

SERVICE_UNAVAILABLE = "service_unavailable"
INTERNAL_ERROR = "internal_error"

# (exception class, HTTP status, error code). A code of None means "the
# exception's own ``code``" (services choose codes such as voucher_not_found).
ERROR_TABLE: tuple[tuple[type[BaseException], int, str | None], ...] = (
    (InvalidRequest, 400, None),
    (Unauthorized, 401, None),
    (Forbidden, 403, None),
    (NotFound, 404, None),
    (Conflict, 409, None),
    (Unavailable, 503, None),
    (ValidationError, 400, "invalid_request"),
    # The bus or the called service is not there: the portal is up, the
    # network behind it is not, so 503 and the client may retry.
    (RpcTimeout, 503, SERVICE_UNAVAILABLE),
    (UnknownService, 503, SERVICE_UNAVAILABLE),
    (queue.Empty, 503, SERVICE_UNAVAILABLE),  # every pooled RPC client busy
    (kombu.exceptions.OperationalError, 503, SERVICE_UNAVAILABLE),
    (amqp.exceptions.ConnectionError, 503, SERVICE_UNAVAILABLE),
    (OSError, 503, SERVICE_UNAVAILABLE),  # includes ConnectionError, timeouts
)

_MESSAGES = {
    SERVICE_UNAVAILABLE: "a service behind the portal is unavailable; retry later",
    INTERNAL_ERROR: "internal error",
    "invalid_request": "the request is invalid",
}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    if details is None:
        details = {}
    elif not isinstance(details, dict):
        details = {"errors": details}
    return {"error": code, "message": message, "details": details}


def error_response(
    status: int, code: str, message: str, details: Any = None
) -> tuple[Response, int]:
    response = jsonify(error_body(code, message, details))
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="computenet"'
    return response, status


def classify(exc: BaseException) -> tuple[int, str, str, Any]:
    """``(status, code, message, details)`` for any exception."""
    for cls, status, code in ERROR_TABLE:
        if not isinstance(exc, cls):
            continue
        if isinstance(exc, ComputenetError):
            return status, exc.code, exc.message, exc.details
        if isinstance(exc, ValidationError):
            return status, code, _MESSAGES[code], exc.messages
        return status, code, _MESSAGES[code], {}
    return 500, INTERNAL_ERROR, _MESSAGES[INTERNAL_ERROR], {}


def _http_code(exc: HTTPException) -> str:
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def handle_http(exc: HTTPException):
        # Flask's own 404/405/415 …, in the same shape as ours.
        return error_response(exc.code or 500, _http_code(exc), exc.description or "")

    @app.errorhandler(Exception)
    def handle_any(exc: Exception):
        status, code, message, details = classify(exc)
        if status >= 500:
            log.error("%s: %s", code, exc, exc_info=status == 500)
        return error_response(status, code, message, details)
