"""The registry's tables: cities, programs, data centres, keys, tokens, and the
read model's bookkeeping (vouchers seen, events processed).

Money columns are integer fen (BigInteger: a national total exceeds 2³¹ fen).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.parking_store import ParkedEventColumns
from services.common.sqltypes import UtcDateTime


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class City(Base):
    """A city or province: from deploy/ or its first ``program_published``.

    Its money columns count every event of the city, including those whose
    program the registry does not know (yet).
    """

    __tablename__ = "cities"

    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    region: Mapped[str | None] = mapped_column(String(64))
    # Reserved by the registry at admission or seed, unique, never changed:
    # the only source of the prefix map metering routes usage_rated by.
    voucher_prefix: Mapped[str | None] = mapped_column(String(8), unique=True)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    committed_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    redeemed_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    released_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    vouchers_issued: Mapped[int] = mapped_column(Integer, default=0)
    # Vouchers released (expired or revoked): active = issued − closed.
    vouchers_closed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=_now)
    # Admitted through the API (credentials issued); removed: its AMQP user is
    # deleted and its tokens revoked, its history stays.
    admitted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    removed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Set at admission, cleared once its credentials are in the answer: a
    # grant that failed after the commit leaves it set, and admitting the
    # city again completes the admission instead of answering 409.
    credentials_pending_since: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Program(Base):
    """A voucher program of a city, as last published, with its read-model money."""

    __tablename__ = "programs"

    city_code: Mapped[str] = mapped_column(
        String(64), ForeignKey("cities.code"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # Null until the program is published (an issue may arrive first).
    kind: Mapped[str | None] = mapped_column(String(32))
    budget_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_bp: Mapped[int | None] = mapped_column(Integer)
    rules_version: Mapped[str | None] = mapped_column(String(64))
    rules_sha256: Mapped[str | None] = mapped_column(String(64))
    committed_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    redeemed_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    released_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    vouchers_issued: Mapped[int] = mapped_column(Integer, default=0)
    vouchers_closed: Mapped[int] = mapped_column(Integer, default=0)
    # Optional terms of program_published: max_rate_bp, bonuses, datacenters.
    terms: Mapped[dict | None] = mapped_column(JSON)


class Voucher(Base):
    """Which program a voucher belongs to, so that a redemption or release that
    does not name its program is still booked against it."""

    __tablename__ = "vouchers"

    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    city_code: Mapped[str] = mapped_column(String(64))
    program_id: Mapped[str] = mapped_column(String(128))
    released_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class ProcessedEvent(Base):
    """Federation events already applied: a redelivered one is dropped.

    Keyed by city too, so that no city can shadow another's events by
    reusing their ids.
    """

    __tablename__ = "processed_events"
    # What the retention prunes by (migration 0008).
    __table_args__ = (Index("ix_processed_events_processed_at", "processed_at"),)

    city_code: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    event: Mapped[str] = mapped_column(String(32))
    processed_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=_now)


class Datacenter(Base):
    __tablename__ = "datacenters"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    operator: Mapped[str] = mapped_column(String(200))
    city: Mapped[str | None] = mapped_column(String(64))
    hub_region: Mapped[str] = mapped_column(String(64))
    government_run: Mapped[bool] = mapped_column(Boolean, default=False)
    # [{gpu_model, count, chip_origin, price_fen_per_gpu_hour}]
    inventory: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=_now)
    removed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # As ``City.credentials_pending_since``: registered through the API and
    # its credentials not delivered yet (null for seeded data centres, which
    # get theirs from ``grant_member_credentials``).
    credentials_pending_since: Mapped[datetime | None] = mapped_column(UtcDateTime())


class DatacenterKey(Base):
    """An HMAC secret a data centre signs usage with; at most two active."""

    __tablename__ = "datacenter_keys"

    # The sequence orders keys by issue, even within one clock tick.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(100), unique=True)
    datacenter_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("datacenters.id"), index=True
    )
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Token(Base):
    """A bearer token, kept as its SHA-256 only, and the role it grants.

    ``id`` is public (listings, revocation); ``expires_at`` null: never
    (tokens issued before expiry existed, or with TOKEN_TTL_DAYS 0).
    """

    __tablename__ = "tokens"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    role: Mapped[str] = mapped_column(String(300), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=_now)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class CityRefusal(Base):
    """A rated record a city refused (``usage_refused``): the latest refusal of
    each record, listed beside metering's dead letters. ``outcome`` is what a
    replay came to (``booked``, ``held``, ``refused``), null before one."""

    __tablename__ = "city_refusals"
    __table_args__ = (
        UniqueConstraint("city_code", "datacenter_id", "record_id"),
        Index("ix_city_refusals_datacenter_id", "datacenter_id", "refused_at"),
        Index("ix_city_refusals_refused_at", "refused_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    city_code: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(128))
    datacenter_id: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128))
    voucher_code: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(512))
    refused_at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    replayed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    outcome: Mapped[str | None] = mapped_column(String(16))


class CityHold(Base):
    """A rated record a city held for review (``usage_held``), its verdict
    (``usage_released``) and any clawback of its subsidy."""

    __tablename__ = "city_holds"
    __table_args__ = (
        UniqueConstraint("city_code", "datacenter_id", "record_id"),
        Index("ix_city_holds_datacenter_id", "datacenter_id", "held_at"),
        Index("ix_city_holds_held_at", "held_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    city_code: Mapped[str] = mapped_column(String(64))
    datacenter_id: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128))
    voucher_code: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))
    evidence: Mapped[dict] = mapped_column(JSON)
    subsidy_fen: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # held | released | refused
    held_at: Mapped[datetime] = mapped_column(UtcDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    decided_by: Mapped[str | None] = mapped_column(String(128))
    decision_reason: Mapped[str | None] = mapped_column(String(512))
    released_fen: Mapped[int] = mapped_column(BigInteger, default=0)


class CityClawback(Base):
    """A booked subsidy a city took back (``voucher_clawed_back``)."""

    __tablename__ = "city_clawbacks"
    __table_args__ = (Index("ix_city_clawbacks_datacenter_id", "datacenter_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    city_code: Mapped[str] = mapped_column(String(64))
    voucher_code: Mapped[str] = mapped_column(String(64))
    datacenter_id: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128))
    clawed_back_fen: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(512))
    actor: Mapped[str] = mapped_column(String(128))
    clawed_back_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ParkedEvent(ParkedEventColumns, Base):
    """A federation event the registry could not apply (issue 16): rejected
    on arrival (``rejected``: not JSON, not the contract, another city's
    name) or failing ``MAX_DELIVERY_ATTEMPTS`` times (``failed``). Kept
    whole, with its reason, for an operator to list and replay; the queue
    goes on (``services/common/parking.py``)."""
