"""The portal's error responses, from the one error table.

Every error leaves the portal as ``{"error": CODE, "message": text,
"details": {...}}`` (CONTRACTS.md §7), with the status and code of
``services.common.http_errors.ERROR_TABLE`` (shared with the data-centre
gateway's agent API). Anything not in the table is a 500 ``internal_error``
whose text stays in the log, never in the response.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from services.common.http_errors import classify, error_body, row_of

log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, details: Any = None
) -> tuple[Response, int]:
    response = jsonify(error_body(code, message, details))
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="computenet"'
    return response, status


def _http_code(exc: HTTPException) -> str:
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def handle_http(exc: HTTPException):
        if row_of(exc) is not None:  # 413: named by the table, as the agent API
            return error_response(*classify(exc))
        # Flask's own 404/405/415 …, in the same shape as ours.
        return error_response(exc.code or 500, _http_code(exc), exc.description or "")

    @app.errorhandler(Exception)
    def handle_any(exc: Exception):
        status, code, message, details = classify(exc)
        if status >= 500:
            log.error("%s: %s", code, exc, exc_info=status == 500)
        return error_response(status, code, message, details)
