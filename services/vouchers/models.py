"""The tables of one city's voucher service (its own database).

``ledger_entries`` is append-only; the balances kept on ``programs`` and
``vouchers`` rows are caches of its sums (``ledger.check_ledger`` proves it),
and CHECK constraints keep them from going negative.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.parking_store import ParkedEventColumns
from services.common.sqltypes import Id, UtcDateTime

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Program(Base):
    """A program's budget state: available + committed + redeemed = budget."""

    __tablename__ = "programs"
    __table_args__ = (
        CheckConstraint("available_fen >= 0", name="available_non_negative"),
        CheckConstraint("committed_fen >= 0", name="committed_non_negative"),
        CheckConstraint("redeemed_fen >= 0", name="redeemed_non_negative"),
        CheckConstraint(
            "available_fen + committed_fen + redeemed_fen = budget_fen",
            name="budget_balances",
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    budget_fen: Mapped[int] = mapped_column(BigInteger)
    available_fen: Mapped[int] = mapped_column(BigInteger)
    committed_fen: Mapped[int] = mapped_column(BigInteger)
    redeemed_fen: Mapped[int] = mapped_column(BigInteger)
    released_fen: Mapped[int] = mapped_column(BigInteger)
    rate_bp: Mapped[int] = mapped_column(Integer)
    max_rate_bp: Mapped[int] = mapped_column(Integer)
    rules_version: Mapped[str] = mapped_column(String(64))
    rules_sha256: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Application(Base):
    """One decision, with the rules version and the evidence it used."""

    __tablename__ = "applications"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    program_id: Mapped[str] = mapped_column(ForeignKey("programs.id"))
    company_id: Mapped[str] = mapped_column(String(64), index=True)
    company: Mapped[dict] = mapped_column(JSON)
    requested_face_value_fen: Mapped[int] = mapped_column(BigInteger)
    decision: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list] = mapped_column(JSON)
    rules_version: Mapped[str] = mapped_column(String(64))
    rules_sha256: Mapped[str] = mapped_column(String(64))
    voucher_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Manual review (``review: manual``): who decided, when and why.
    reviewed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    review_reason: Mapped[str | None] = mapped_column(String(512), nullable=True)


class Voucher(Base):
    """balance = face value − redeemed − released ≥ 0."""

    __tablename__ = "vouchers"
    __table_args__ = (
        CheckConstraint("redeemed_fen >= 0", name="redeemed_non_negative"),
        CheckConstraint("released_fen >= 0", name="released_non_negative"),
        CheckConstraint(
            "redeemed_fen + released_fen <= face_value_fen", name="balance_non_negative"
        ),
        # One company holds at most one active voucher per program.
        Index(
            "uq_vouchers_active_company_program",
            "company_id",
            "program_id",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
        Index("ix_vouchers_status_expires_at", "status", "expires_at"),
        Index("ix_vouchers_company_id", "company_id"),
    )

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    program_id: Mapped[str] = mapped_column(ForeignKey("programs.id"))
    company_id: Mapped[str] = mapped_column(String(64))
    application_id: Mapped[str] = mapped_column(ForeignKey("applications.id"))
    status: Mapped[str] = mapped_column(String(16))
    face_value_fen: Mapped[int] = mapped_column(BigInteger)
    redeemed_fen: Mapped[int] = mapped_column(BigInteger)
    released_fen: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Set when the voucher expires or is revoked (its balance released).
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    closed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    close_reason: Mapped[str | None] = mapped_column(String(512), nullable=True)

    @property
    def balance_fen(self) -> int:
        return self.face_value_fen - self.redeemed_fen - self.released_fen


class Redemption(Base):
    """A booked usage record (``kind=usage``) or the reversal of one.

    A usage record is booked at most once per (datacenter_id, record_id), and
    reversed at most once; ``source_record_id`` is the record whose arrival
    wrote the row (the correcting record, for a reversal), so a redelivery
    finds every event it must publish again.
    """

    __tablename__ = "redemptions"
    __table_args__ = (
        UniqueConstraint("datacenter_id", "record_id", "kind"),
        Index("ix_redemptions_source", "datacenter_id", "source_record_id"),
        # Corrections only (migration 0003): led by the corrected record.
        Index(
            "ix_redemptions_correction_of",
            "correction_of",
            "datacenter_id",
            postgresql_where=text("correction_of IS NOT NULL"),
            sqlite_where=text("correction_of IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    datacenter_id: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # usage | reversal
    source_record_id: Mapped[str] = mapped_column(String(128))
    correction_of: Mapped[str | None] = mapped_column(String(128), nullable=True)
    voucher_code: Mapped[str] = mapped_column(ForeignKey("vouchers.code"), index=True)
    program_id: Mapped[str] = mapped_column(ForeignKey("programs.id"))
    gpu_seconds: Mapped[int] = mapped_column(BigInteger)
    cost_fen: Mapped[int] = mapped_column(BigInteger)
    rate_bp: Mapped[int] = mapped_column(Integer)
    subsidy_fen: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    booked_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The job the subsidy paid for (migration 0008): what a monthly statement
    # shows a finance department. Null on rows booked before it.
    tenant_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    gpu_model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gpu_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class RejectedUsage(Base):
    """A rated record that was not booked, with the reason (once per record)."""

    __tablename__ = "rejected_usage"
    __table_args__ = (UniqueConstraint("datacenter_id", "record_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    datacenter_id: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128))
    voucher_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(512))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class LedgerEntry(Base):
    """Append-only: one movement of money on one account."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    account: Mapped[str] = mapped_column(String(128), index=True)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    reference: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class OutboxEvent(Base):
    """A federation event written in the transaction of the fact it reports.

    Published right after the commit, and by a timer for any left unpublished
    (a crash between commit and publish), always with the same ``event_id``.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
        # What the retention prunes by (migration 0006).
        Index("ix_outbox_published_at", "published_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    event: Mapped[str] = mapped_column(String(32))
    body: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Binding(Base):
    """A tenant of a data centre the voucher may pay for, once its holder says so.

    The data centre asks (``requested``), the holder decides (``authorised``,
    ``withdrawn``); a record is subsidised only while its binding is
    authorised and only if it started at or after ``authorised_at`` (the
    latest authorisation). ``binding_changes`` keeps every step.
    """

    __tablename__ = "bindings"
    __table_args__ = (
        CheckConstraint(
            "status IN ('requested', 'authorised', 'withdrawn')", name="status_known"
        ),
    )

    voucher_code: Mapped[str] = mapped_column(
        ForeignKey("vouchers.code"), primary_key=True
    )
    datacenter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    # The data centre's latest request, the latest authorisation, the latest
    # withdrawal (by the holder, or a cancel of a request by the data centre).
    requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    authorised_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    withdrawn_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class BindingChange(Base):
    """Append-only: who did what to a binding, and when.

    A data centre's request or cancel is written once per event
    (``event_id`` unique), so a redelivered ``binding_requested`` changes
    nothing, even after the holder has decided since.
    """

    __tablename__ = "binding_changes"
    __table_args__ = (
        Index(
            "ix_binding_changes_binding", "voucher_code", "datacenter_id", "tenant_id"
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    voucher_code: Mapped[str] = mapped_column(ForeignKey("vouchers.code"))
    datacenter_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16))  # request|cancel|authorise|withdraw
    status: Mapped[str] = mapped_column(String(16))  # the binding's status after it
    actor: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str | None] = mapped_column(
        String(128), unique=True, nullable=True
    )
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class HeldUsage(Base):
    """A rated record held for review (CONTRACTS §9: rated, not subsidised).

    Held on arrival (``usage_rated`` with a hold: nothing booked, ``record``
    kept whole to be booked on release) or after booking (``usage_hold``:
    the booking reversed, ``retroactive``). ``status`` held → released or
    refused, once; every decision is in ``usage_decisions`` too.
    """

    __tablename__ = "held_usage"
    __table_args__ = (
        UniqueConstraint("datacenter_id", "record_id"),
        Index("ix_held_usage_status_held_at", "status", "held_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    datacenter_id: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128))
    voucher_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    program_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(String(32))  # over_capacity | double_claim
    evidence: Mapped[dict] = mapped_column(JSON)
    # The usage_rated record as received (wire form), booked on release;
    # null for a retroactive hold (its booking is the redemption row).
    record: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    retroactive: Mapped[bool] = mapped_column(Boolean)
    gpu_seconds: Mapped[int] = mapped_column(BigInteger)
    cost_fen: Mapped[int] = mapped_column(BigInteger)
    # What it would book (on arrival), or what was booked and reversed.
    subsidy_fen: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # held | released | refused
    held_at: Mapped[datetime] = mapped_column(UtcDateTime)
    decided_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decision_reason: Mapped[str | None] = mapped_column(String(512), nullable=True)


class UsageDecision(Base):
    """Append-only: every hold, release, refusal on review, clawback and
    replayed refusal of a record, with who decided and why (the audit)."""

    __tablename__ = "usage_decisions"
    __table_args__ = (Index("ix_usage_decisions_record", "datacenter_id", "record_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    datacenter_id: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128))
    voucher_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(512))
    subsidy_fen: Mapped[int] = mapped_column(BigInteger)
    # The message or request the decision came from (a replay's event id).
    reference: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ParkedEvent(ParkedEventColumns, Base):
    """A message of the city's usage queue it could not apply (issue 16): a
    ``usage_rated``, ``binding_requested`` or ``usage_hold`` not of the
    contract (``rejected``, at once) or failing ``MAX_DELIVERY_ATTEMPTS``
    times (``failed``). Kept whole with its reason, for the city's staff or
    the ministry to list and replay; the bookings behind it go on."""
