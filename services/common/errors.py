"""One error contract for every service (STYLE.md principle 4).

Services raise these with a machine-readable ``code`` (``voucher_not_found``,
``budget_exhausted`` …); they cross RPC as themselves (registered for
deserialisation), and the portal maps each class to one HTTP status in one
table (``services/common/http_errors.py``), shared by both Flask apps.
"""

from __future__ import annotations

from typing import Any

from nameko.exceptions import deserialize_to_instance


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


@deserialize_to_instance
class InvalidRequest(ComputenetError):
    default_code = "invalid_request"


@deserialize_to_instance
class Unauthorized(ComputenetError):
    default_code = "unauthorized"


@deserialize_to_instance
class Forbidden(ComputenetError):
    default_code = "forbidden"


@deserialize_to_instance
class NotFound(ComputenetError):
    default_code = "not_found"


@deserialize_to_instance
class Conflict(ComputenetError):
    default_code = "conflict"


@deserialize_to_instance
class Unavailable(ComputenetError):
    default_code = "unavailable"


EXPECTED = (InvalidRequest, Unauthorized, Forbidden, NotFound, Conflict, Unavailable)
