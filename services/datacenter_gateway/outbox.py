"""The outbox: every record the gateway acknowledged, durably, until published.

SQLite (WAL) by default, PostgreSQL when ``DATABASE_URL`` says so. A record is
acknowledged to the agent only after its row is committed here; the relay
publishes rows in insertion order and marks them published afterwards, so a
crash in between publishes a row twice (metering drops the duplicate by
``record_id``), never zero times.

The tenant → voucher hand-over of CONTRACTS.md §6 lives here too: it is part
of what turns an agent's record into the body that is signed. Each change of
it writes, in the same transaction, a binding request (``binding_requests``)
that the relay publishes like a record: the voucher's holder is asked, and
nothing of the hand-over is lost between the database and the bus.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from services.common.db import retry_on_conflict
from services.common.sqltypes import Id, UtcDateTime
from services.common.units import utcnow
from services.datacenter_gateway.domain import (
    CANCEL,
    REQUEST,
    BindingRequest,
    PreparedRecord,
    binding_request,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class OutboxRecord(Base):
    """One usage record as it will be published: ``body`` is the signed bytes."""

    __tablename__ = "outbox_records"

    id: Mapped[int] = mapped_column(
        Id,
        primary_key=True,
        autoincrement=True,
    )
    record_id: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    # sha256 of the record as the agent sent it, before the tenant's voucher
    # was added: a retried POST is a duplicate, a changed record a conflict.
    agent_digest: Mapped[str] = mapped_column(String(64), nullable=False)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    # Copied out of the body for the capacity report (GPUs busy right now).
    gpu_model: Mapped[str] = mapped_column(String(64), nullable=False)
    gpu_count: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    ended_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    # W3C trace context of the POST that stored it, continued by the relay.
    traceparent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    __table_args__ = (
        Index("ix_outbox_records_unpublished", "published_at", "id"),
        Index("ix_outbox_records_ended_at", "ended_at"),
    )


class TenantVoucher(Base):
    """The voucher a tenant handed to this data centre (PUT …/voucher)."""

    __tablename__ = "tenant_vouchers"

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    voucher_code: Mapped[str] = mapped_column(String(64), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class BindingRequestRow(Base):
    """A binding request (CONTRACTS.md §6) as it will be published."""

    __tablename__ = "binding_requests"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    voucher_code: Mapped[str] = mapped_column(String(64), nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    requested_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    traceparent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    __table_args__ = (
        Index("ix_binding_requests_unpublished", "published_at", "id"),
        Index("ix_binding_requests_tenant_id", "tenant_id", "id"),
    )


class TailPosition(Base):
    """How far ``tail`` mode has read a file, so a restart resumes there."""

    __tablename__ = "tail_positions"

    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    inode: Mapped[int] = mapped_column(BigInteger, nullable=False)
    offset: Mapped[int] = mapped_column(BigInteger, nullable=False)
    header: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int


@dataclass(frozen=True)
class Conflict:
    """Records of a batch whose record_id is stored with a different body."""

    indexes: dict[str, str]


@dataclass(frozen=True)
class PendingRow:
    """An unpublished row: a usage record, or a binding request (whose
    ``record_id`` is its ``request_id``); either way the message id."""

    id: int
    record_id: str
    body: bytes
    traceparent: str | None


class Outbox:
    """The durable store behind the agent API, the relay and the capacity report."""

    def __init__(self, engine: Engine, backlog_cache_s: float = 1.0):
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._backlog_cache_s = backlog_cache_s
        self._backlog: tuple[float, int] | None = None
        self._lock = threading.Lock()

    # -- ingest ---------------------------------------------------------------

    def ingest(
        self,
        records: Sequence[PreparedRecord],
        datacenter_id: str,
        traceparent: str | None = None,
        attempts: int = 3,
        keep_first: bool = False,
    ) -> IngestResult | Conflict:
        """Store a validated batch in one transaction, or nothing at all.

        ``keep_first``: a record_id stored before is a duplicate even if its
        body differs (formats whose repeated observations of one fact differ in
        timing, such as nvidia-smi's accounted processes); else a conflict.
        """
        # Another request may store one of these record_ids between our read
        # and our insert: read again and decide again.
        return retry_on_conflict(
            lambda: self._ingest_once(records, datacenter_id, traceparent, keep_first),
            attempts,
        )

    def _ingest_once(
        self,
        records: Sequence[PreparedRecord],
        datacenter_id: str,
        traceparent: str | None,
        keep_first: bool = False,
    ) -> IngestResult | Conflict:
        ids = list({r.record_id for r in records})
        tenants = list({r.tenant_id for r in records if r.voucher_code is None})
        now = utcnow()
        with self.sessions.begin() as session:
            stored: dict[str, str] = {}
            for chunk in _chunks(ids, 500):
                rows = session.execute(
                    select(OutboxRecord.record_id, OutboxRecord.agent_digest).where(
                        OutboxRecord.record_id.in_(chunk)
                    )
                )
                stored.update(dict(rows.all()))
            vouchers: dict[str, str] = {}
            if tenants:
                rows = session.execute(
                    select(TenantVoucher.tenant_id, TenantVoucher.voucher_code).where(
                        TenantVoucher.tenant_id.in_(tenants)
                    )
                )
                vouchers = dict(rows.all())
            conflicts: dict[str, str] = {}
            fresh: list[PreparedRecord] = []
            duplicates = 0
            for index, record in enumerate(records):
                digest = stored.get(record.record_id)
                if digest is None:
                    stored[record.record_id] = record.agent_digest
                    fresh.append(record)
                elif keep_first or digest == record.agent_digest:
                    duplicates += 1
                else:
                    conflicts[str(index)] = (
                        f"record_id {record.record_id!r} was already accepted "
                        "with a different body"
                    )
            if conflicts:
                return Conflict(conflicts)
            if fresh:
                # One executemany, not an ORM object per row: ingest speed.
                session.execute(
                    insert(OutboxRecord),
                    [
                        {
                            "record_id": record.record_id,
                            "body": record.body(
                                datacenter_id, vouchers.get(record.tenant_id)
                            ),
                            "agent_digest": record.agent_digest,
                            "tenant_id": record.tenant_id,
                            "gpu_model": record.fields["gpu_model"],
                            "gpu_count": record.fields["gpu_count"],
                            "started_at": record.fields["started_at"],
                            "ended_at": record.fields["ended_at"],
                            "traceparent": traceparent,
                            "created_at": now,
                        }
                        for record in fresh
                    ],
                )
        accepted = len(fresh)
        with self._lock:
            if self._backlog is not None:
                self._backlog = (self._backlog[0], self._backlog[1] + accepted)
        return IngestResult(accepted, duplicates)

    # -- tenant vouchers ------------------------------------------------------

    def set_voucher(
        self,
        tenant_id: str,
        voucher_code: str,
        datacenter_id: str,
        traceparent: str | None = None,
    ) -> BindingRequest:
        """Hand ``voucher_code`` over for ``tenant_id`` and ask its holder.

        One transaction: the hand-over, a ``cancel`` of the voucher it
        replaces, and a ``request`` of this one. The same voucher again asks
        nothing new: the request that stands is returned.
        """
        now = utcnow()
        with self.sessions.begin() as session:
            row = session.get(TenantVoucher, tenant_id)
            if row is not None and row.voucher_code == voucher_code:
                standing = _latest_request(session, tenant_id, voucher_code)
                if standing is not None:
                    return standing
            if row is None:
                session.add(
                    TenantVoucher(
                        tenant_id=tenant_id, voucher_code=voucher_code, updated_at=now
                    )
                )
            else:
                if row.voucher_code != voucher_code:
                    _add_request(
                        session,
                        binding_request(
                            datacenter_id, tenant_id, row.voucher_code, CANCEL, now
                        ),
                        traceparent,
                    )
                row.voucher_code = voucher_code
                row.updated_at = now
            request = binding_request(
                datacenter_id, tenant_id, voucher_code, REQUEST, now
            )
            _add_request(session, request, traceparent)
        return request

    def get_voucher(self, tenant_id: str) -> str | None:
        with self.sessions() as session:
            row = session.get(TenantVoucher, tenant_id)
            return row.voucher_code if row else None

    def clear_voucher(
        self, tenant_id: str, datacenter_id: str, traceparent: str | None = None
    ) -> BindingRequest | None:
        """End the hand-over and cancel its request (one transaction); None
        when the tenant had handed over no voucher."""
        with self.sessions.begin() as session:
            row = session.get(TenantVoucher, tenant_id)
            if row is None:
                return None
            request = binding_request(
                datacenter_id, tenant_id, row.voucher_code, CANCEL, utcnow()
            )
            session.delete(row)
            _add_request(session, request, traceparent)
        return request

    # -- tail mode ------------------------------------------------------------

    def tail_position(self, path: str) -> tuple[int, int, str | None] | None:
        """(inode, offset, header) last saved for ``path``."""
        with self.sessions() as session:
            row = session.get(TailPosition, path)
            return (row.inode, row.offset, row.header) if row else None

    def save_tail_position(
        self, path: str, inode: int, offset: int, header: str | None
    ) -> None:
        with self.sessions.begin() as session:
            row = session.get(TailPosition, path)
            if row is None:
                row = TailPosition(path=path)
                session.add(row)
            row.inode, row.offset, row.header = inode, offset, header
            row.updated_at = utcnow()

    # -- relay ----------------------------------------------------------------

    def pending(self, limit: int) -> list[PendingRow]:
        """Up to ``limit`` unpublished rows, oldest first.

        The transaction ends before the caller publishes: no lock is held
        while the broker is slow.
        """
        with self.sessions() as session:
            rows = session.execute(
                select(
                    OutboxRecord.id,
                    OutboxRecord.record_id,
                    OutboxRecord.body,
                    OutboxRecord.traceparent,
                )
                .where(OutboxRecord.published_at.is_(None))
                .order_by(OutboxRecord.id)
                .limit(limit)
            ).all()
        return [
            PendingRow(r.id, r.record_id, bytes(r.body), r.traceparent) for r in rows
        ]

    def mark_published(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        now = utcnow()
        with self.sessions.begin() as session:
            for chunk in _chunks(list(ids), 500):
                session.execute(
                    update(OutboxRecord)
                    .where(OutboxRecord.id.in_(chunk))
                    .values(published_at=now)
                )
        with self._lock:
            self._backlog = None

    def pending_bindings(self, limit: int) -> list[PendingRow]:
        """Up to ``limit`` unpublished binding requests, oldest first."""
        with self.sessions() as session:
            rows = session.execute(
                select(
                    BindingRequestRow.id,
                    BindingRequestRow.request_id,
                    BindingRequestRow.body,
                    BindingRequestRow.traceparent,
                )
                .where(BindingRequestRow.published_at.is_(None))
                .order_by(BindingRequestRow.id)
                .limit(limit)
            ).all()
        return [
            PendingRow(r.id, r.request_id, bytes(r.body), r.traceparent) for r in rows
        ]

    def mark_bindings_published(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        now = utcnow()
        with self.sessions.begin() as session:
            session.execute(
                update(BindingRequestRow)
                .where(BindingRequestRow.id.in_(list(ids)))
                .values(published_at=now)
            )

    def binding_backlog(self) -> int:
        """Binding requests not yet published (few: one per hand-over)."""
        with self.sessions() as session:
            count = session.scalar(
                select(func.count())
                .select_from(BindingRequestRow)
                .where(BindingRequestRow.published_at.is_(None))
            )
        return int(count or 0)

    # -- status and capacity --------------------------------------------------

    def backlog(self, fresh: bool = False) -> int:
        """Unpublished rows; cached briefly, since every POST asks."""
        with self._lock:
            cached = self._backlog
        if (
            not fresh
            and cached
            and time.monotonic() - cached[0] < self._backlog_cache_s
        ):
            return cached[1]
        with self.sessions() as session:
            count = session.scalar(
                select(func.count())
                .select_from(OutboxRecord)
                .where(OutboxRecord.published_at.is_(None))
            )
        with self._lock:
            self._backlog = (time.monotonic(), int(count or 0))
        return int(count or 0)

    def oldest_unsent_at(self) -> datetime | None:
        with self.sessions() as session:
            return session.scalar(
                select(OutboxRecord.created_at)
                .where(OutboxRecord.published_at.is_(None))
                .order_by(OutboxRecord.id)
                .limit(1)
            )

    def allocated_gpus(self, now: datetime) -> dict[str, int]:
        """GPUs per model of the records whose span covers ``now``."""
        with self.sessions() as session:
            rows = session.execute(
                select(OutboxRecord.gpu_model, func.sum(OutboxRecord.gpu_count))
                .where(OutboxRecord.ended_at >= now, OutboxRecord.started_at <= now)
                .group_by(OutboxRecord.gpu_model)
            ).all()
        return {model: int(total or 0) for model, total in rows}

    def close(self) -> None:
        self.engine.dispose()


def _add_request(session, request: BindingRequest, traceparent: str | None) -> None:
    """Store ``request``, unless it is stored already: the same id is the same
    request (same tenant, voucher, action and moment)."""
    if session.scalar(
        select(BindingRequestRow.id).where(
            BindingRequestRow.request_id == request.request_id
        )
    ):
        return
    session.add(
        BindingRequestRow(
            request_id=request.request_id,
            tenant_id=request.tenant_id,
            voucher_code=request.voucher_code,
            action=request.action,
            requested_at=request.requested_at,
            body=request.body,
            traceparent=traceparent,
        )
    )
    session.flush()


def _latest_request(
    session, tenant_id: str, voucher_code: str
) -> BindingRequest | None:
    """The last request of ``voucher_code`` for ``tenant_id``, if any (a
    hand-over stored before binding requests existed has none)."""
    row = session.scalars(
        select(BindingRequestRow)
        .where(
            BindingRequestRow.tenant_id == tenant_id,
            BindingRequestRow.voucher_code == voucher_code,
            BindingRequestRow.action == REQUEST,
        )
        .order_by(BindingRequestRow.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    return BindingRequest(
        row.request_id,
        row.tenant_id,
        row.voucher_code,
        row.action,
        row.requested_at,
        bytes(row.body),
    )


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
