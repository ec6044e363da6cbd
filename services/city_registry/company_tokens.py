"""Companies' portal tokens: the RPCs of ``city_registry`` that issue them
(mixed into :class:`~services.city_registry.service.CityRegistryService`).

A company is a principal in every city under one role, ``company:<credit
code>`` (DESIGN.md §2, §8). It gets its token once, in the portal's answer to
the application (or review) that issues its first voucher: the portal asks
:meth:`issue_company_token` each time a voucher is issued, and only a company
with no live token gets one. "No live token yet" is decided by the store
under the role's lock, so two first vouchers issued at once in two cities
give one token, not two. After that, :meth:`reissue_company_token` (the
national admin, or the staff of a city where the company holds a voucher,
as the portal checks) revokes its earlier tokens and issues a new one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from nameko import config

from services.city_registry.domain import tokens
from services.common.config import TOKEN_TTL_DAYS
from services.common.errors import EXPECTED
from services.common.rpc_access import rpc
from services.common.units import format_ts, utcnow


def token_ttl_days() -> int:
    """How long a new portal token lives (TOKEN_TTL_DAYS; 0: forever)."""
    value = config.get(TOKEN_TTL_DAYS)
    return tokens.DEFAULT_TOKEN_TTL_DAYS if value is None else int(value)


class CompanyTokens:
    """Needs ``self.store``, the registry's store, of the service it is
    mixed into."""

    @rpc(expected_exceptions=EXPECTED)
    def issue_company_token(self, credit_code: str) -> dict[str, Any] | None:
        """A company's first token (``{"token", "id", "role", "expires_at"}``),
        or None when the company already has a live one. A malformed credit
        code is ``InvalidRequest invalid_credit_code``."""
        role = tokens.company_role(credit_code)
        token, token_id, now, expiry = self._new_company_token()
        stored = self.store.add_first_token(
            tokens.token_digest(token),
            role,
            now,
            token_id=token_id,
            expires_at=expiry,
        )
        if not stored:
            return None
        return _issued(token, token_id, role, expiry)

    @rpc(expected_exceptions=EXPECTED)
    def reissue_company_token(self, credit_code: str) -> dict[str, Any]:
        """Revoke every token of the company and issue a new one, shown only
        here: ``{"token", "id", "role", "expires_at", "revoked_tokens"}``."""
        role = tokens.company_role(credit_code)
        token, token_id, now, expiry = self._new_company_token()
        revoked = self.store.replace_tokens(
            tokens.token_digest(token),
            role,
            now,
            token_id=token_id,
            expires_at=expiry,
        )
        return _issued(token, token_id, role, expiry) | {"revoked_tokens": revoked}

    def _new_company_token(self) -> tuple[str, str, datetime, datetime | None]:
        now = utcnow()
        expiry = tokens.token_expiry(now, default_ttl_days=token_ttl_days())
        return tokens.new_token(), tokens.new_token_id(), now, expiry


def _issued(
    token: str, token_id: str, role: str, expiry: datetime | None
) -> dict[str, Any]:
    return {
        "token": token,
        "id": token_id,
        "role": role,
        "expires_at": format_ts(expiry) if expiry is not None else None,
    }
