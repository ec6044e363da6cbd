"""metering's tables: rated usage records, hourly rollups, capacity, dead letters.

``migrations/versions/`` (0001–0007) create exactly these; change both
together.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.parking_store import ParkedEventColumns
from services.common.sqltypes import Id

Timestamp = DateTime(timezone=True)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UsageRecord(Base):
    """One rated usage record; (datacenter_id, record_id) is unique forever."""

    __tablename__ = "usage_records"
    __table_args__ = (
        UniqueConstraint("datacenter_id", "record_id"),
        # "is this record corrected?" is asked for every record stored; only
        # corrections are in it (migration 0004), so the other records, nearly
        # all of them, cost no entry in it.
        Index(
            "ix_usage_records_datacenter_id_correction_of",
            "datacenter_id",
            "correction_of",
            postgresql_where=text("correction_of IS NOT NULL"),
            sqlite_where=text("correction_of IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    datacenter_id: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128))
    # sha256 of the canonical record: tells a redelivery from a conflicting one.
    record_sha256: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(128))
    voucher_code: Mapped[str | None] = mapped_column(String(32))
    # The city that issued the voucher (null when there is none).
    city: Mapped[str | None] = mapped_column(String(64))
    gpu_model: Mapped[str] = mapped_column(String(64))
    gpu_count: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    ended_at: Mapped[datetime] = mapped_column(Timestamp)
    gpu_seconds: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(Text)
    correction_of: Mapped[str | None] = mapped_column(String(128))
    cost_fen: Mapped[int] = mapped_column(BigInteger)
    unit_price_fen_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)
    # The data centre's attributes when rated, so a re-published event is the same.
    government_run: Mapped[bool] = mapped_column(Boolean)
    hub_region: Mapped[str] = mapped_column(String(64))
    chip_origin: Mapped[str] = mapped_column(String(16))
    rated_at: Mapped[datetime] = mapped_column(Timestamp)
    # Issue 15 (migration 0006). The GPUs the record names, as the canonical
    # JSON array of their UUIDs (null: it names none); and why it is held
    # (``HoldSchema``'s canonical JSON; null: not held), see ``holds``.
    gpu_uuids: Mapped[str | None] = mapped_column(Text, nullable=True)
    hold: Mapped[str | None] = mapped_column(Text, nullable=True)


class UsageRollup(Base):
    """Usage per data centre, city, tenant, voucher, GPU model and hour.

    ``city`` and ``voucher_code`` are ``""`` for voucher-less usage, because a
    NULL would make the unique key (and the upsert on it) never match.
    """

    __tablename__ = "usage_rollups_hourly"
    __table_args__ = (
        UniqueConstraint(
            "datacenter_id",
            "city",
            "tenant_id",
            "voucher_code",
            "gpu_model",
            "hour",
            name="uq_usage_rollups_hourly_bucket",  # the long default is > 63 chars
        ),
        Index(None, "hour"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    datacenter_id: Mapped[str] = mapped_column(String(64))
    city: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(128))
    voucher_code: Mapped[str] = mapped_column(String(32))
    gpu_model: Mapped[str] = mapped_column(String(64))
    hour: Mapped[datetime] = mapped_column(Timestamp)
    records: Mapped[int] = mapped_column(BigInteger)
    gpu_seconds: Mapped[int] = mapped_column(BigInteger)
    cost_fen: Mapped[int] = mapped_column(BigInteger)


class UsageTotal(Base):
    """All-time usage per data centre: the sum of its hourly rollups, kept by
    the same transactions (migration 0005), so the overview's all-time
    figures cost one row per data centre and stripe, not every rollup ever
    written.

    A transaction adds to its connection's ``stripe`` (PostgreSQL: the
    backend's pid modulo ``STRIPES``; SQLite: 0), so concurrent consumers of
    one data centre rarely wait on one another's row; readers sum the
    stripes.
    """

    __tablename__ = "usage_totals"

    STRIPES = 16

    datacenter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stripe: Mapped[int] = mapped_column(Integer, primary_key=True)
    records: Mapped[int] = mapped_column(BigInteger)
    gpu_seconds: Mapped[int] = mapped_column(BigInteger)
    cost_fen: Mapped[int] = mapped_column(BigInteger)


class CapacityBucket(Base):
    """The GPU-seconds claimed per data centre, GPU model and UTC hour by the
    records that count (migration 0006): what a batch compares with the
    registered count × 3 600, and the row it locks (``FOR UPDATE`` through
    its upsert, in key order) so two consumers decide a bucket one at a time.
    """

    __tablename__ = "capacity_buckets"
    # What the retention prunes by (migration 0007).
    __table_args__ = (Index(None, "hour"),)

    datacenter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    gpu_model: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)
    gpu_seconds: Mapped[int] = mapped_column(BigInteger)


class CapacityClaim(Base):
    """One record's share of one bucket (``holds.hour_shares``): read, in the
    canonical order of the primary key, only when the bucket is over."""

    __tablename__ = "capacity_claims"
    __table_args__ = (Index(None, "hour"),)  # the retention's (migration 0007)

    datacenter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    gpu_model: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)
    record_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    gpu_seconds: Mapped[int] = mapped_column(BigInteger)


class GpuClaim(Base):
    """A GPU (by UUID) claimed by a record that counts, over its span."""

    __tablename__ = "gpu_claims"
    __table_args__ = (Index(None, "ended_at"),)  # the retention's (migration 0007)

    datacenter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    gpu_uuid: Mapped[str] = mapped_column(String(128), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)
    record_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    ended_at: Mapped[datetime] = mapped_column(Timestamp)


class CapacityReport(Base):
    """One capacity report (CONTRACTS.md §2), with its totals for the overview."""

    __tablename__ = "capacity_reports"
    __table_args__ = (
        UniqueConstraint("datacenter_id", "reported_at"),
        Index(None, "reported_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    datacenter_id: Mapped[str] = mapped_column(String(64))
    reported_at: Mapped[datetime] = mapped_column(Timestamp)
    received_at: Mapped[datetime] = mapped_column(Timestamp)
    report_sha256: Mapped[str] = mapped_column(String(64))
    total_gpus: Mapped[int] = mapped_column(BigInteger)
    allocated_gpus: Mapped[int] = mapped_column(BigInteger)
    gpus: Mapped[list] = mapped_column(JSON)


class DeadLetter(Base):
    """A message refused for a reason; stored whole so an operator can act on it."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        Index(None, "datacenter_id", "received_at"),
        Index(None, "reason", "received_at"),
        Index(None, "received_at"),  # the retention's (migration 0007)
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(Timestamp)
    routing_key: Mapped[str] = mapped_column(String(255))
    datacenter_id: Mapped[str] = mapped_column(String(255))
    record_id: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict] = mapped_column(JSON)
    # The raw body as UTF-8 text, undecodable bytes replaced (U+FFFD).
    body: Mapped[str] = mapped_column(Text)
    # content_type and message_id as received, so the message can be replayed.
    properties: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # The last replay (``replay_dead_letter``): when, and what came of it.
    replayed_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    replay_outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    replay_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)


class MeteredDatacenter(Base):
    """The attributes of each data centre metering has rated, for per-region views."""

    __tablename__ = "metered_datacenters"

    datacenter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hub_region: Mapped[str] = mapped_column(String(64))
    government_run: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)


class DeliveryAttempt(Base):
    """How often a message failed on its own with an unexpected error.

    Keyed by the sha256 of its routing key and body; after
    ``MAX_DELIVERY_ATTEMPTS`` it is stored as a ``processing_error`` dead
    letter and acked, so one poison message cannot wedge the queue.
    """

    __tablename__ = "delivery_attempts"

    message_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)


class ParkedEvent(ParkedEventColumns, Base):
    """A usage, capacity or binding message that passed every check but
    failed to apply ``MAX_DELIVERY_ATTEMPTS`` times on its own (issue 16):
    a fault of the platform (a bug, a value the database refuses, an event
    no city queue takes), not of the data centre, so not a dead letter.
    Kept whole, with the headers that carry its signature and the
    properties that name its publisher, for the ministry to replay once
    the cause is fixed; the queue goes on."""

    headers: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    properties: Mapped[dict | None] = mapped_column(JSON, nullable=True)
