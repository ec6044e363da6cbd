"""What the ledger's SQL does differently on PostgreSQL and SQLite.

Concurrent writers on one voucher are serialised by ``SELECT … FOR UPDATE`` on
PostgreSQL; SQLite has no row locks, so there a process-wide lock wraps every
writing transaction (and SQLite serialises writers between processes itself).
Bulk rows go by COPY on PostgreSQL and by one INSERT elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Select, Table, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import InstrumentedAttribute, Session

# Greenthreads (and threads) of this process writing a SQLite database.
_SQLITE_WRITE_LOCK = threading.RLock()


def dialect(session: Session) -> str:
    """``postgresql`` or ``sqlite``: the database behind ``session``."""
    return session.get_bind().dialect.name


@contextmanager
def writing(session: Session) -> Iterator[None]:
    """Hold this process's SQLite write lock (nothing on PostgreSQL)."""
    if dialect(session) == "sqlite":
        with _SQLITE_WRITE_LOCK:
            yield
    else:
        yield


@contextmanager
def transaction(session: Session) -> Iterator[None]:
    """One writing transaction: committed at the end, rolled back on any error."""
    with writing(session):
        try:
            yield
            session.commit()
        except BaseException:
            session.rollback()
            raise


def locked(session: Session, statement: Select, *, key_share: bool = False) -> Select:
    """``statement`` FOR UPDATE where the database has row locks.

    Always re-read: a session that committed earlier keeps its objects
    (``expire_on_commit=False``), and a locking read that returned those stale
    values would lose the updates other transactions committed in between.
    ``key_share`` locks FOR NO KEY UPDATE, which still excludes every other
    writer but not the key-share locks of inserts referencing the row.
    """
    statement = statement.execution_options(populate_existing=True)
    if dialect(session) == "sqlite":
        return statement
    return statement.with_for_update(key_share=key_share)


def lock_rows(
    session: Session,
    model: type,
    key: InstrumentedAttribute,
    values: Iterable[str],
    *,
    key_share: bool = False,
) -> dict[str, Any]:
    """``model`` rows whose ``key`` is in ``values``, locked in key order (so
    that two transactions locking overlapping sets cannot deadlock)."""
    values = sorted(values)
    if not values:
        return {}
    statement = select(model).where(key.in_(values)).order_by(key)
    return {
        getattr(row, key.key): row
        for row in session.scalars(locked(session, statement, key_share=key_share))
    }


def insert_rows(
    session: Session, table: Table, columns: Sequence[str], rows: Sequence[tuple]
) -> None:
    """Insert ``rows`` (tuples of ``columns``) in the session's transaction.

    On PostgreSQL by COPY: one stream instead of one INSERT per row, which
    cost the server (and the hub, waiting on each) several times more. Its
    errors come as SQLAlchemy's, so that a unique violation is an
    ``IntegrityError`` to the callers as with ``insert``.
    """
    if not rows:
        return
    if dialect(session) != "postgresql":
        session.execute(
            insert(table), [dict(zip(columns, r, strict=True)) for r in rows]
        )
        return
    statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
    connection = session.connection().connection.driver_connection
    try:
        with connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc
