"""The portal's append-only audit log: who wrote what, when, and the answer.

Every request that may change state (any method but GET, HEAD, OPTIONS) is
recorded after it is answered, refused ones included, by an ``after_request``
hook, so a blueprint added later is audited without doing anything. A view
adds what only it knows (the application decided, the voucher issued) with
:func:`note`. Bodies are never stored whole: a response may carry credentials
that are shown once, and a request may carry a company's figures.

Anonymous writes that are refused (no token, a token that is not valid,
a path that does not exist) are **counted, not stored**: anyone can send them
without end, and a row each would let them fill the disk and bury the
entries that matter. ``portal_refused_writes`` keeps one row per endpoint and
status (both from a fixed set: the portal's routes, or ``unknown``), with the
count and the first and last time; the national admin reads it at
``GET /api/v1/audit/anonymous``. Every write by an authenticated caller is
still one entry of its own, refused or not.

The log lives in the portal's own small database (``AUDIT_DATABASE_URL``,
SQLite under ``var/`` by default, PostgreSQL in deployment). The code only
ever inserts and selects entries; nothing updates one (only the counters
move), and only the retention (``audit_retention``: the ``audit`` class of
``services.common.retention``, at least six months) deletes the oldest.
Two tables, created on first use, so no migration history is kept for them
yet.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, g, request
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from services.common.db import make_engine
from services.common.units import utcnow

AUDIT_DATABASE_URL = "AUDIT_DATABASE_URL"  # config key
DEFAULT_AUDIT_URL = (
    f"sqlite:///{Path(__file__).resolve().parent.parent / 'var' / 'portal.db'}"
)
AUDIT = "audit"  # key in app.extensions
AUDIT_SCOPE = "audit_scope"  # key in flask.g: the city a view found it concerns
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

log = logging.getLogger(__name__)

metadata = MetaData()
audit_log = Table(
    "portal_audit_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("actor", String(200), nullable=False, index=True),
    Column("token_sha256", String(16), nullable=True),
    Column("scope", String(64), nullable=True, index=True),
    Column("action", String(100), nullable=False),
    Column("method", String(8), nullable=False),
    Column("path", String(500), nullable=False),
    Column("status", Integer, nullable=False),
    Column("remote_addr", String(64), nullable=True),
    Column("details", JSON, nullable=False),
)

refused_writes = Table(
    "portal_refused_writes",
    metadata,
    Column("action", String(100), primary_key=True),
    Column("status", Integer, primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("first_at", DateTime(timezone=True), nullable=False),
    Column("last_at", DateTime(timezone=True), nullable=False),
)


class AuditLog:
    """Insert and page through audit entries; the table is made on first use."""

    def __init__(self, url: str):
        self.url = url
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                engine = make_engine(self.url)
                metadata.create_all(engine, checkfirst=True)
                self._engine = engine
        return self._engine

    def record(self, **entry: Any) -> None:
        entry.setdefault("at", utcnow())
        entry.setdefault("details", {})
        with self.engine.begin() as connection:
            connection.execute(insert(audit_log), [entry])

    def count_refused(self, action: str, status: int) -> None:
        """One more anonymous write refused at ``action`` with ``status``."""
        now = utcnow()
        dialect = self.engine.dialect.name
        module = postgresql if dialect == "postgresql" else sqlite
        statement = module.insert(refused_writes).values(
            action=action, status=status, count=1, first_at=now, last_at=now
        )
        statement = statement.on_conflict_do_update(
            index_elements=["action", "status"],
            set_={"count": refused_writes.c["count"] + 1, "last_at": now},
        )
        with self.engine.begin() as connection:
            connection.execute(statement)

    def refused(self) -> list[dict[str, Any]]:
        """The counters, the most refused first."""
        query = select(refused_writes).order_by(
            refused_writes.c["count"].desc(),
            refused_writes.c.action,
            refused_writes.c.status,
        )
        with self.engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
        for row in rows:
            row["first_at"], row["last_at"] = (
                _aware(row["first_at"]),
                _aware(row["last_at"]),
            )
        return rows

    def entries(
        self,
        *,
        scope: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """Newest first, with the total matching the filters."""
        query = select(audit_log)
        for column, value in (("scope", scope), ("actor", actor), ("action", action)):
            if value is not None:
                query = query.where(audit_log.c[column] == value)
        count = select(func.count()).select_from(query.subquery())
        page = query.order_by(audit_log.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as connection:
            total = connection.execute(count).scalar_one()
            rows = [dict(row._mapping) for row in connection.execute(page)]
        for row in rows:
            row["at"] = _aware(row["at"])
        return rows, total

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored one is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def note(**details: Any) -> None:
    """Add ``details`` to the audit entry of the current request."""
    g.setdefault("audit_details", {}).update(details)


def _token_fingerprint() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    # A short digest tells two tokens of one role apart; it cannot be used.
    return hashlib.sha256(token.strip().encode()).hexdigest()[:16]


def _record_write(response: Response) -> Response:
    if request.method in READ_METHODS or not request.path.startswith("/api/"):
        return response
    role = g.get("role")
    audit: AuditLog = current_app.extensions[AUDIT]
    if role is None and response.status_code >= 400:
        try:
            audit.count_refused(request.endpoint or "unknown", response.status_code)
        except Exception:  # noqa: BLE001 - a lost count must not fail the answer
            log.exception("could not count a refused %s", request.method)
        return response
    view_args = request.view_args or {}
    # The city or data centre the entry concerns: the path's city, else the
    # city of the path's voucher (a company's writes name no city), else the
    # caller's own; a city admin reads back the entries of its scope.
    scope = view_args.get("city") or g.get(AUDIT_SCOPE) or getattr(role, "scope", None)
    try:
        audit.record(
            actor=str(role) if role is not None else "anonymous",
            token_sha256=_token_fingerprint(),
            scope=scope,
            action=request.endpoint or "unknown",
            method=request.method,
            path=request.path[:500],
            status=response.status_code,
            remote_addr=request.remote_addr,
            details={**view_args, **g.get("audit_details", {})},
        )
    except Exception:  # noqa: BLE001 - the write is done; say loudly it is unaudited
        log.exception("could not audit %s %s", request.method, request.path)
    return response


def init_app(app: Flask, url: str) -> AuditLog:
    audit = AuditLog(url)
    app.extensions[AUDIT] = audit
    app.after_request(_record_write)
    return audit
