"""SQLite settings that the acknowledgements depend on (issue 16 item 5)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from services.common.db import make_engine

# PRAGMA synchronous reads back as a number: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA.
FULL = 2


def test_every_sqlite_connection_commits_durably(tmp_path):
    """A 202 or an ack follows a commit: each commit must reach the disk."""
    engine = make_engine(f"sqlite:///{tmp_path / 'outbox.db'}", pool_size=2)
    try:
        with engine.connect() as first, engine.connect() as second:
            for connection in (first, second):
                assert connection.execute(text("PRAGMA synchronous")).scalar() == FULL
                mode = connection.execute(text("PRAGMA journal_mode")).scalar()
                assert mode == "wal"
    finally:
        engine.dispose()


def test_retry_on_conflict_tries_again_after_each_collision_then_gives_up():
    from sqlalchemy.exc import IntegrityError

    from services.common.db import retry_on_conflict

    calls, rollbacks = [], []

    def collide_twice():
        calls.append(1)
        if len(calls) < 3:
            raise IntegrityError("insert", {}, Exception("unique"))
        return "stored"

    assert retry_on_conflict(collide_twice, 3, lambda: rollbacks.append(1)) == "stored"
    assert (len(calls), len(rollbacks)) == (3, 2)

    calls.clear()
    with pytest.raises(IntegrityError):
        retry_on_conflict(collide_twice, 2)
    assert len(calls) == 2


def test_retry_on_conflict_lets_other_errors_through_at_once():
    from services.common.db import retry_on_conflict

    calls = []

    def broken():
        calls.append(1)
        raise ValueError("not a collision")

    with pytest.raises(ValueError):
        retry_on_conflict(broken, 5)
    assert len(calls) == 1
    with pytest.raises(ValueError):
        retry_on_conflict(broken, 0)
