"""SQLAlchemy 2 for every service: engines, the session dependency, migrations.

PostgreSQL in deployment and CI (``postgresql://`` URLs use psycopg 3),
SQLite files under ``var/`` as the embedded default for a one-machine run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from weakref import WeakKeyDictionary

from nameko import config
from nameko.extensions import DependencyProvider
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from services.common.config import DATABASE_URL

T = TypeVar("T")

# What every SQLite connection runs with (read back by a test).
SQLITE_SYNCHRONOUS = "FULL"


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, **kwargs) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL, not WAL's usual NORMAL: a gateway answers 202 and a
            # consumer acks only after a commit, so every commit must survive
            # a power loss (NORMAL may lose the last ones). Its cost, one
            # fsync of the WAL per commit, is in docs/ARCHITECTURE.md.
            cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # Every session in UTC, whatever the server's or database's default: a
    # timestamptz comes back as UTC, so hours are cut at UTC hours everywhere
    # (metering's rollups, a correction's reversal landing in its original's
    # bucket) and the same on any server.
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("options", "-c timezone=UTC")
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


class Database(DependencyProvider):
    """Injects one SQLAlchemy ``Session`` per worker, closed when it ends.

    The engine is built in ``setup()`` from the ``DATABASE_URL`` config key and
    disposed in ``stop()``.
    """

    def __init__(self, **engine_options):
        self.engine_options = engine_options
        self.engine: Engine | None = None
        self.sessionmaker: sessionmaker[Session] | None = None
        self.sessions: WeakKeyDictionary = WeakKeyDictionary()

    def setup(self):
        self.engine = make_engine(config[DATABASE_URL], **self.engine_options)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    def stop(self):
        if self.engine is not None:
            self.engine.dispose()

    def get_dependency(self, worker_ctx) -> Session:
        session = self.sessionmaker()
        self.sessions[worker_ctx] = session
        return session

    def worker_teardown(self, worker_ctx):
        session = self.sessions.pop(worker_ctx, None)
        if session is not None:
            session.close()


def retry_on_conflict(
    attempt: Callable[[], T],
    attempts: int,
    rollback: Callable[[], None] | None = None,
) -> T:
    """``attempt()``, again (up to ``attempts`` times in all) when it raises
    ``IntegrityError``: a competing transaction inserted a key we had read as
    absent, between our read and our commit, and reading again decides
    differently (a duplicate, a prefix taken). ``rollback`` (the session's)
    runs after each collision; the last collision is raised. Every
    read-then-insert loop of the services is this one (issue 16)."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for remaining in range(attempts - 1, -1, -1):
        try:
            return attempt()
        except IntegrityError:
            if rollback is not None:
                rollback()
            if not remaining:
                raise
    raise AssertionError("unreachable")
