"""One error contract for every service (STYLE.md principle 4).

Services raise these with a machine-readable ``code`` (``voucher_not_found``,
``budget_exhausted`` …); they cross RPC as themselves (``remote_errors.py``
registers them with nameko for deserialisation, so that this module stays
pure and domain modules may raise them), and both Flask apps map each class
to one HTTP status through one table (``services/common/http_errors.py``).
"""

from __future__ import annotations

from typing import Any


class ComputenetError(Exception):
    """Base: ``code`` for machines, ``message`` for people, ``details`` for both."""

    default_code = "error"

    def __init__(self, code: str | None = None, message: str = "", details: Any = None):
        self.code = code or self.default_code
        self.message = message or self.code
        self.details = details if details is not None else {}
        super().__init__(self.code, self.message, self.details)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(ComputenetError):
    """The request itself is wrong (a malformed code, an unknown role, a face
    value out of range): asking again the same way will fail again. HTTP 400."""

    default_code = "invalid_request"


class Unauthorized(ComputenetError):
    """No valid token. HTTP 401."""

    default_code = "unauthorized"


class Forbidden(ComputenetError):
    """A valid token whose role may not do this (another city's admin, a company
    reading another company's voucher). HTTP 403."""

    default_code = "forbidden"


class NotFound(ComputenetError):
    """No such city, voucher, data centre or key. HTTP 404."""

    default_code = "not_found"


class Conflict(ComputenetError):
    """The request is well formed but the state forbids it now: a voucher
    already revoked, a city already admitted, a budget exhausted. HTTP 409."""

    default_code = "conflict"


class Unavailable(ComputenetError):
    """Something this answer needs is down or slow; try again later. HTTP 503."""

    default_code = "unavailable"


EXPECTED = (InvalidRequest, Unauthorized, Forbidden, NotFound, Conflict, Unavailable)
