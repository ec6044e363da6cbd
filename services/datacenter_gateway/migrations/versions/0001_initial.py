"""The outbox and the tenant → voucher hand-over.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

from services.common.sqltypes import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox_records",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("agent_digest", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("gpu_model", sa.String(64), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("ended_at", UtcDateTime(), nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("published_at", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_records"),
        sa.UniqueConstraint("record_id", name="uq_outbox_records_record_id"),
    )
    op.create_index(
        "ix_outbox_records_unpublished", "outbox_records", ["published_at", "id"]
    )
    op.create_index("ix_outbox_records_ended_at", "outbox_records", ["ended_at"])
    op.create_table(
        "tenant_vouchers",
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(64), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_vouchers"),
    )


def downgrade() -> None:
    op.drop_table("tenant_vouchers")
    op.drop_index("ix_outbox_records_ended_at", table_name="outbox_records")
    op.drop_index("ix_outbox_records_unpublished", table_name="outbox_records")
    op.drop_table("outbox_records")
