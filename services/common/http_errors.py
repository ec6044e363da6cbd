"""The one error table of every HTTP API: exception type → status and error code.

Both Flask apps, the portal (``gateway/errors.py``) and a data centre's agent
API (``services/datacenter_gateway/app.py``), answer an error as ``{"error":
CODE, "message": text, "details": {...}}`` (CONTRACTS.md §6, §7) with the
status this table gives. Services raise the classes of
``services.common.errors``, which keep their own ``code``; everything else
is mapped by the first row whose class the exception is an instance of
(Werkzeug's HTTP exceptions too where a row names one, such as 413; the
others keep their own status and name). Anything not in the table is a 500
``internal_error`` whose text stays in the log, never in the response. Pure:
the apps turn this into responses.
"""

from __future__ import annotations

import queue
from typing import Any

import amqp.exceptions
import kombu.exceptions
from marshmallow import ValidationError
from nameko.exceptions import RpcTimeout, UnknownService
from werkzeug.exceptions import RequestEntityTooLarge

from services.common import errors

SERVICE_UNAVAILABLE = "service_unavailable"
INTERNAL_ERROR = "internal_error"
BODY_TOO_LARGE = "body_too_large"

# (exception class, HTTP status, error code). A code of None means "the
# exception's own ``code``" (services choose codes such as voucher_not_found).
ERROR_TABLE: tuple[tuple[type[BaseException], int, str | None], ...] = (
    (errors.InvalidRequest, 400, None),
    (errors.Unauthorized, 401, None),
    (errors.Forbidden, 403, None),
    (errors.NotFound, 404, None),
    (errors.Conflict, 409, None),
    (errors.Unavailable, 503, None),
    (ValidationError, 400, "invalid_request"),
    # Werkzeug's, raised by services/common/http_limits.py or as a body is
    # read: a row here so that both apps name it alike.
    (RequestEntityTooLarge, 413, BODY_TOO_LARGE),
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
    BODY_TOO_LARGE: "the request body is larger than this API accepts",
}


def row_of(exc: BaseException) -> tuple[int, str | None] | None:
    """``(status, code)`` of the first row ``exc`` is an instance of, or None."""
    for cls, status, code in ERROR_TABLE:
        if isinstance(exc, cls):
            return status, code
    return None


def status_of(exc: BaseException) -> int:
    """The HTTP status of ``exc``: its row's, else 500."""
    row = row_of(exc)
    return 500 if row is None else row[0]


def classify(exc: BaseException) -> tuple[int, str, str, Any]:
    """``(status, code, message, details)`` for any exception."""
    row = row_of(exc)
    if row is None:
        return 500, INTERNAL_ERROR, _MESSAGES[INTERNAL_ERROR], {}
    status, code = row
    if isinstance(exc, errors.ComputenetError):
        return status, exc.code, exc.message, exc.details
    if isinstance(exc, ValidationError):
        return status, code, _MESSAGES[code], exc.messages
    return status, code, _MESSAGES[code], {}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON body of an error (details always an object)."""
    if details is None:
        details = {}
    elif not isinstance(details, dict):
        details = {"errors": details}
    return {"error": code, "message": message, "details": details}
