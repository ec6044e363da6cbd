"""Migration 0004 on a registry that already has tokens: each gets a public
id and no expiry (docs/portal.md), and still authenticates."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from services.city_registry.domain import tokens
from services.common.db import make_engine
from services.common.migrations import upgrade

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_existing_tokens_get_an_id_and_no_expiry(backend, sqlite_url, pg_url_factory):
    url = sqlite_url if backend == "sqlite" else pg_url_factory("tokens0003")
    upgrade("city_registry", url, "0002")
    engine = make_engine(url)
    created = datetime(2025, 1, 1, tzinfo=UTC)
    with engine.begin() as connection:
        for n in range(3):
            connection.execute(
                text(
                    "INSERT INTO tokens (token_sha256, role, created_at)"
                    " VALUES (:digest, 'national_admin', :at)"
                ),
                {"digest": tokens.token_digest(f"old-{n}"), "at": created},
            )
    upgrade("city_registry", url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, expires_at FROM tokens")).all()
    engine.dispose()
    assert len({row.id for row in rows}) == 3
    assert all(tokens.TOKEN_ID.match(row.id) for row in rows)
    assert [row.expires_at for row in rows] == [None] * 3
