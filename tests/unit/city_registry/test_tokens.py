"""Tokens' expiry and status: the rules of domain/tokens.py (the RPC methods
are in test_service.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.city_registry.domain import tokens
from services.common.errors import InvalidRequest

NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def test_a_token_lives_the_default_unless_issued_for_less():
    assert tokens.token_expiry(NOW) == NOW + timedelta(days=90)
    assert tokens.token_expiry(NOW, default_ttl_days=7) == NOW + timedelta(days=7)
    assert tokens.token_expiry(NOW, default_ttl_days=0) is None
    assert tokens.token_expiry(NOW, ttl_days=1) == NOW + timedelta(days=1)
    assert tokens.token_expiry(NOW, expires_at="2026-03-02T08:00:00Z") == (
        NOW + timedelta(days=1)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl_days": 0},
        {"ttl_days": -1},
        {"ttl_days": 1.5},
        {"ttl_days": True},
        {"ttl_days": "30"},
        {"ttl_days": tokens.MAX_TOKEN_TTL_DAYS + 1},
        {"expires_at": "2026-02-28T08:00:00Z"},  # past
        {"expires_at": "2026-03-01T08:00:00Z"},  # now
        {"expires_at": "2026-03-02T08:00:00"},  # no zone
        {"expires_at": "tomorrow"},
        {"expires_at": "2099-01-01T00:00:00Z"},  # past the longest life
        {"ttl_days": 1, "expires_at": "2026-03-02T08:00:00Z"},
    ],
)
def test_a_wrong_expiry_is_refused(kwargs):
    with pytest.raises(InvalidRequest) as info:
        tokens.token_expiry(NOW, **kwargs)
    assert info.value.code == "invalid_token_expiry"


def test_a_token_expires_at_its_moment():
    expires = NOW + timedelta(days=1)
    assert tokens.is_usable(None, expires, expires - timedelta(seconds=1))
    assert not tokens.is_usable(None, expires, expires)
    assert tokens.is_usable(None, None, NOW + timedelta(days=10_000))
    assert not tokens.is_usable(NOW, None, NOW)
    assert tokens.token_status(None, expires, expires) == "expired"
    assert tokens.token_status(NOW, expires, NOW) == "revoked"
    assert tokens.token_status(None, None, NOW) == "active"
