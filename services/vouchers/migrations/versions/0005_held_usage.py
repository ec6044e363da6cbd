"""Held usage and the audit of review decisions (issue 15).

``held_usage``: rated records held for review, on arrival or after booking;
``usage_decisions``: append-only, every hold, release, refusal on review,
clawback and replayed refusal, with its actor and reason.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "held_usage",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(64), nullable=True),
        sa.Column("program_id", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("record", sa.JSON(), nullable=True),
        sa.Column("retroactive", sa.Boolean(), nullable=False),
        sa.Column("gpu_seconds", sa.BigInteger(), nullable=False),
        sa.Column("cost_fen", sa.BigInteger(), nullable=False),
        sa.Column("subsidy_fen", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("held_at", Ts, nullable=False),
        sa.Column("decided_at", Ts, nullable=True),
        sa.Column("decided_by", sa.String(128), nullable=True),
        sa.Column("decision_reason", sa.String(512), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_held_usage")),
        sa.UniqueConstraint(
            "datacenter_id", "record_id", name=op.f("uq_held_usage_datacenter_id")
        ),
    )
    op.create_index("ix_held_usage_status_held_at", "held_usage", ["status", "held_at"])
    op.create_table(
        "usage_decisions",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(64), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("subsidy_fen", sa.BigInteger(), nullable=False),
        sa.Column("reference", sa.String(128), nullable=True),
        sa.Column("decided_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_decisions")),
    )
    op.create_index(
        "ix_usage_decisions_record",
        "usage_decisions",
        ["datacenter_id", "record_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_usage_decisions_record", table_name="usage_decisions")
    op.drop_table("usage_decisions")
    op.drop_index("ix_held_usage_status_held_at", table_name="held_usage")
    op.drop_table("held_usage")
