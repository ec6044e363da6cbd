"""Alembic, one history per service, run on start.

Each service has ``services/<name>/migrations/`` with an ``env.py`` that calls
:func:`run_env` with its own metadata and version table, and a ``versions/``
folder. :func:`upgrade` applies them to a database URL.
"""

from __future__ import annotations

import fcntl
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, text
from sqlalchemy.pool import NullPool

from services.common.db import make_engine, normalise_url

SERVICES_DIR = Path(__file__).resolve().parent.parent


def alembic_config(service: str, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SERVICES_DIR / service / "migrations"))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(service: str, url: str, revision: str = "head") -> None:
    """Bring ``url``'s schema for ``service`` up to ``revision``.

    Competing consumers start together: the migration runs under a lock (a
    PostgreSQL advisory lock, or a file lock beside a SQLite file), so the
    second process waits and then finds the schema up to date.
    """
    with _migration_lock(service, url):
        command.upgrade(alembic_config(service, url), revision)


@contextmanager
def _migration_lock(service: str, url: str) -> Iterator[None]:
    url = normalise_url(url)
    if url.startswith("postgresql"):
        key = zlib.crc32(f"computenet-migrate-{service}".encode())
        engine = make_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:key)"), {"key": key}
                    )
        finally:
            engine.dispose()
        return
    path = url.split("///", 1)[-1] if url.startswith("sqlite") else ""
    if not path or path == ":memory:":
        yield
        return
    lock_path = Path(f"{path}.migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_env(target_metadata: MetaData, version_table: str) -> None:
    """The body of every service's ``migrations/env.py``."""
    url = context.config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=version_table,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
