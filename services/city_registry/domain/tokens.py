"""Roles and tokens (CONTRACTS.md §7), and data-centre signing-key rotation."""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from services.city_registry.domain.state import DATACENTER_ID
from services.common.contracts import CITY_CODE
from services.common.errors import InvalidRequest

# Two keys stay active so that a data centre can roll its gateway onto the new
# one while messages signed with the old one are still in flight.
ACTIVE_KEYS_PER_DATACENTER = 2

# A company id is the registration id the city knows it by: anything printable
# without ':' (the role separator) or whitespace.
COMPANY_ID = re.compile(r"^[^:\s]{1,128}$")


def validate_role(role: Any) -> str:
    """A role of CONTRACTS.md §7, or ``InvalidRequest invalid_role``."""
    if isinstance(role, str):
        parts = role.split(":")
        kind = parts[0]
        if kind == "national_admin" and len(parts) == 1:
            return role
        if kind == "city_admin" and len(parts) == 2 and CITY_CODE.match(parts[1]):
            return role
        if (
            kind == "company"
            and len(parts) == 3
            and CITY_CODE.match(parts[1])
            and COMPANY_ID.match(parts[2])
        ):
            return role
        if kind == "datacenter" and len(parts) == 2 and DATACENTER_ID.match(parts[1]):
            return role
    raise InvalidRequest(
        "invalid_role",
        f"{role!r} is not a role: national_admin, city_admin:<city>, "
        "company:<city>:<company_id> or datacenter:<id>",
        {"role": role if isinstance(role, str) else repr(role)},
    )


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """Tokens are stored as their SHA-256 only: a leaked table grants nothing."""
    return hashlib.sha256(token.encode()).hexdigest()


def keys_to_revoke(active_key_ids_newest_first: list[str]) -> list[str]:
    """After issuing a key, all but the newest two active keys are revoked."""
    return active_key_ids_newest_first[ACTIVE_KEYS_PER_DATACENTER:]
