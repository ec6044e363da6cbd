"""The voucher service's first schema: programs, applications, vouchers, ledger.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "programs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("budget_fen", sa.BigInteger(), nullable=False),
        sa.Column("available_fen", sa.BigInteger(), nullable=False),
        sa.Column("committed_fen", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_fen", sa.BigInteger(), nullable=False),
        sa.Column("released_fen", sa.BigInteger(), nullable=False),
        sa.Column("rate_bp", sa.Integer(), nullable=False),
        sa.Column("max_rate_bp", sa.Integer(), nullable=False),
        sa.Column("rules_version", sa.String(64), nullable=False),
        sa.Column("rules_sha256", sa.String(64), nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_programs")),
        sa.CheckConstraint(
            "available_fen >= 0", name=op.f("ck_programs_available_non_negative")
        ),
        sa.CheckConstraint(
            "committed_fen >= 0", name=op.f("ck_programs_committed_non_negative")
        ),
        sa.CheckConstraint(
            "redeemed_fen >= 0", name=op.f("ck_programs_redeemed_non_negative")
        ),
        sa.CheckConstraint(
            "available_fen + committed_fen + redeemed_fen = budget_fen",
            name=op.f("ck_programs_budget_balances"),
        ),
    )
    op.create_table(
        "applications",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("program_id", sa.String(64), nullable=False),
        sa.Column("company_id", sa.String(64), nullable=False),
        sa.Column("company", sa.JSON(), nullable=False),
        sa.Column("requested_face_value_fen", sa.BigInteger(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("rules_version", sa.String(64), nullable=False),
        sa.Column("rules_sha256", sa.String(64), nullable=False),
        sa.Column("voucher_code", sa.String(32), nullable=True),
        sa.Column("decided_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_applications")),
        sa.ForeignKeyConstraint(
            ["program_id"],
            ["programs.id"],
            name=op.f("fk_applications_program_id_programs"),
        ),
    )
    op.create_index(op.f("ix_applications_company_id"), "applications", ["company_id"])
    op.create_table(
        "vouchers",
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("program_id", sa.String(64), nullable=False),
        sa.Column("company_id", sa.String(64), nullable=False),
        sa.Column("application_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("face_value_fen", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_fen", sa.BigInteger(), nullable=False),
        sa.Column("released_fen", sa.BigInteger(), nullable=False),
        sa.Column("issued_at", Ts, nullable=False),
        sa.Column("expires_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_vouchers")),
        sa.ForeignKeyConstraint(
            ["program_id"],
            ["programs.id"],
            name=op.f("fk_vouchers_program_id_programs"),
        ),
        sa.ForeignKeyConstraint(
            ["application_id"],
            ["applications.id"],
            name=op.f("fk_vouchers_application_id_applications"),
        ),
        sa.CheckConstraint(
            "redeemed_fen >= 0", name=op.f("ck_vouchers_redeemed_non_negative")
        ),
        sa.CheckConstraint(
            "released_fen >= 0", name=op.f("ck_vouchers_released_non_negative")
        ),
        sa.CheckConstraint(
            "redeemed_fen + released_fen <= face_value_fen",
            name=op.f("ck_vouchers_balance_non_negative"),
        ),
    )
    op.create_index(
        "uq_vouchers_active_company_program",
        "vouchers",
        ["company_id", "program_id"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "redemptions",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source_record_id", sa.String(128), nullable=False),
        sa.Column("correction_of", sa.String(128), nullable=True),
        sa.Column("voucher_code", sa.String(32), nullable=False),
        sa.Column("program_id", sa.String(64), nullable=False),
        sa.Column("gpu_seconds", sa.BigInteger(), nullable=False),
        sa.Column("cost_fen", sa.BigInteger(), nullable=False),
        sa.Column("rate_bp", sa.Integer(), nullable=False),
        sa.Column("subsidy_fen", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("booked_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_redemptions")),
        sa.ForeignKeyConstraint(
            ["voucher_code"],
            ["vouchers.code"],
            name=op.f("fk_redemptions_voucher_code_vouchers"),
        ),
        sa.ForeignKeyConstraint(
            ["program_id"],
            ["programs.id"],
            name=op.f("fk_redemptions_program_id_programs"),
        ),
        sa.UniqueConstraint(
            "datacenter_id",
            "record_id",
            "kind",
            name=op.f("uq_redemptions_datacenter_id"),
        ),
        sa.UniqueConstraint("event_id", name=op.f("uq_redemptions_event_id")),
    )
    op.create_index(
        op.f("ix_redemptions_voucher_code"), "redemptions", ["voucher_code"]
    )
    op.create_index(
        "ix_redemptions_source", "redemptions", ["datacenter_id", "source_record_id"]
    )
    op.create_index(
        "ix_redemptions_correction_of",
        "redemptions",
        ["datacenter_id", "correction_of"],
    )
    op.create_table(
        "rejected_usage",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(512), nullable=False),
        sa.Column("received_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejected_usage")),
        sa.UniqueConstraint(
            "datacenter_id", "record_id", name=op.f("uq_rejected_usage_datacenter_id")
        ),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("account", sa.String(128), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("reference", sa.String(256), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    op.create_index(op.f("ix_ledger_entries_account"), "ledger_entries", ["account"])


def downgrade() -> None:
    op.drop_table("ledger_entries")
    op.drop_table("rejected_usage")
    op.drop_table("redemptions")
    op.drop_table("vouchers")
    op.drop_table("applications")
    op.drop_table("programs")
