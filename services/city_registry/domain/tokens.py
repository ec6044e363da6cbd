"""Roles and tokens (CONTRACTS.md §7), and data-centre signing-key rotation.

A token is a secret shown once; the registry keeps its SHA-256, the role it
grants, a public id (``tok_`` and 16 hex digits: what a listing shows and a
revocation names, never the secret or its digest), when it was made, when it
expires, when it was revoked and, to within ``LAST_USED_RESOLUTION``, when it
was last used.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timedelta
from typing import Any

from services.city_registry.domain.state import DATACENTER_ID
from services.common import creditcode
from services.common.contracts import CITY_CODE
from services.common.errors import InvalidRequest
from services.common.units import format_ts

# Two keys stay active so that a data centre can roll its gateway onto the new
# one while messages signed with the old one are still in flight.
ACTIVE_KEYS_PER_DATACENTER = 2


def validate_role(role: Any) -> str:
    """A role of CONTRACTS.md §7, or ``InvalidRequest invalid_role``.

    A company's role names its unified social credit code, normalised and
    with the right check character (one identity in every city: no city in
    the role).
    """
    if isinstance(role, str):
        parts = role.split(":")
        kind = parts[0]
        if kind == "national_admin" and len(parts) == 1:
            return role
        if kind == "city_admin" and len(parts) == 2 and CITY_CODE.match(parts[1]):
            return role
        if kind == "company" and len(parts) == 2 and _is_credit_code(parts[1]):
            return role
        if kind == "datacenter" and len(parts) == 2 and DATACENTER_ID.match(parts[1]):
            return role
    raise InvalidRequest(
        "invalid_role",
        f"{role!r} is not a role: national_admin, city_admin:<city>, "
        "company:<credit code> or datacenter:<id>",
        {"role": role if isinstance(role, str) else repr(role)},
    )


def _is_credit_code(text: str) -> bool:
    try:
        return creditcode.parse(text) == text
    except creditcode.InvalidCreditCode:
        return False


def company_role(credit_code: Any) -> str:
    """``company:<code>`` of a credit code (normalised), or ``InvalidRequest
    invalid_credit_code`` saying what is wrong with it."""
    try:
        code = creditcode.parse(credit_code)
    except creditcode.InvalidCreditCode as exc:
        raise InvalidRequest(
            "invalid_credit_code",
            str(exc),
            {"credit_code": credit_code if isinstance(credit_code, str) else None},
        ) from None
    return f"company:{code}"


# A token lives this long unless issued for less (TOKEN_TTL_DAYS; 0: forever).
DEFAULT_TOKEN_TTL_DAYS = 90
MAX_TOKEN_TTL_DAYS = 3650
TOKEN_ID = re.compile(r"^tok_[0-9a-f]{16}$")
# ``last_used_at`` is written at most this often per token: authenticating
# stays a read, not a write per request.
LAST_USED_RESOLUTION = timedelta(minutes=5)


def new_token_id() -> str:
    return f"tok_{secrets.token_hex(8)}"


def token_expiry(
    now: datetime,
    *,
    ttl_days: Any = None,
    expires_at: Any = None,
    default_ttl_days: int = DEFAULT_TOKEN_TTL_DAYS,
) -> datetime | None:
    """When a token issued ``now`` expires: ``ttl_days`` from now, or at
    ``expires_at`` (an aware datetime or ISO 8601 text), else the default
    (None when the default is 0: it never expires).

    ``InvalidRequest invalid_token_expiry`` for both at once, a ttl outside
    1..MAX_TOKEN_TTL_DAYS, or a moment that is past or further than that.
    """

    def refuse(message: str) -> InvalidRequest:
        return InvalidRequest(
            "invalid_token_expiry",
            message,
            {"ttl_days": repr(ttl_days), "expires_at": repr(expires_at)},
        )

    if ttl_days is not None and expires_at is not None:
        raise refuse("give ttl_days or expires_at, not both")
    longest = now + timedelta(days=MAX_TOKEN_TTL_DAYS)
    if ttl_days is not None:
        if isinstance(ttl_days, bool) or not isinstance(ttl_days, int):
            raise refuse("ttl_days must be a whole number of days")
        if not 1 <= ttl_days <= MAX_TOKEN_TTL_DAYS:
            raise refuse(f"ttl_days must be 1 to {MAX_TOKEN_TTL_DAYS}")
        return now + timedelta(days=ttl_days)
    if expires_at is not None:
        moment = _moment(expires_at)
        if moment is None:
            raise refuse("expires_at must be an ISO 8601 time with its zone")
        if not now < moment <= longest:
            raise refuse(f"expires_at must be after now, within {MAX_TOKEN_TTL_DAYS} d")
        return moment
    if not default_ttl_days:
        return None
    return now + timedelta(days=int(default_ttl_days))


def _moment(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        return None
    return value


def is_usable(
    revoked_at: datetime | None, expires_at: datetime | None, now: datetime
) -> bool:
    """Not revoked, and not expired: a token expires *at* ``expires_at``."""
    return revoked_at is None and (expires_at is None or now < expires_at)


def needs_touch(last_used_at: datetime | None, now: datetime) -> bool:
    return last_used_at is None or now - last_used_at >= LAST_USED_RESOLUTION


def token_status(
    revoked_at: datetime | None, expires_at: datetime | None, now: datetime
) -> str:
    if revoked_at is not None:
        return "revoked"
    return "active" if is_usable(None, expires_at, now) else "expired"


def token_view(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A token as the registry lists it: never its secret or its digest."""
    return {
        "id": row["id"],
        "role": row["role"],
        "status": token_status(row["revoked_at"], row["expires_at"], now),
        **{
            name: format_ts(row[name]) if row[name] is not None else None
            for name in ("created_at", "expires_at", "revoked_at", "last_used_at")
        },
    }


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """Tokens are stored as their SHA-256 only: a leaked table grants nothing."""
    return hashlib.sha256(token.encode()).hexdigest()


def keys_to_revoke(active_key_ids_newest_first: list[str]) -> list[str]:
    """After issuing a key, all but the newest two active keys are revoked."""
    return active_key_ids_newest_first[ACTIVE_KEYS_PER_DATACENTER:]
