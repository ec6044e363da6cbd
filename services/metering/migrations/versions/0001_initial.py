"""metering: usage records, hourly rollups, capacity reports, dead letters.

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

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("record_sha256", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(32), nullable=True),
        sa.Column("city", sa.String(64), nullable=True),
        sa.Column("gpu_model", sa.String(64), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("ended_at", Timestamp, nullable=False),
        sa.Column("gpu_seconds", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=True),
        sa.Column("correction_of", sa.String(128), nullable=True),
        sa.Column("cost_fen", sa.BigInteger(), nullable=False),
        sa.Column("unit_price_fen_per_gpu_hour", sa.BigInteger(), nullable=False),
        sa.Column("government_run", sa.Boolean(), nullable=False),
        sa.Column("hub_region", sa.String(64), nullable=False),
        sa.Column("chip_origin", sa.String(16), nullable=False),
        sa.Column("rated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_records"),
        sa.UniqueConstraint(
            "datacenter_id",
            "record_id",
            name="uq_usage_records_datacenter_id_record_id",
        ),
    )
    op.create_table(
        "usage_rollups_hourly",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("city", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(32), nullable=False),
        sa.Column("gpu_model", sa.String(64), nullable=False),
        sa.Column("hour", Timestamp, nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("gpu_seconds", sa.BigInteger(), nullable=False),
        sa.Column("cost_fen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_rollups_hourly"),
        sa.UniqueConstraint(
            "datacenter_id",
            "city",
            "tenant_id",
            "voucher_code",
            "gpu_model",
            "hour",
            name="uq_usage_rollups_hourly_bucket",
        ),
    )
    op.create_index("ix_usage_rollups_hourly_hour", "usage_rollups_hourly", ["hour"])
    op.create_table(
        "capacity_reports",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("reported_at", Timestamp, nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("report_sha256", sa.String(64), nullable=False),
        sa.Column("total_gpus", sa.BigInteger(), nullable=False),
        sa.Column("allocated_gpus", sa.BigInteger(), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_capacity_reports"),
        sa.UniqueConstraint(
            "datacenter_id",
            "reported_at",
            name="uq_capacity_reports_datacenter_id_reported_at",
        ),
    )
    op.create_index(
        "ix_capacity_reports_reported_at", "capacity_reports", ["reported_at"]
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("datacenter_id", sa.String(255), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
    )
    op.create_index(
        "ix_dead_letters_datacenter_id_received_at",
        "dead_letters",
        ["datacenter_id", "received_at"],
    )
    op.create_index(
        "ix_dead_letters_reason_received_at", "dead_letters", ["reason", "received_at"]
    )


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("capacity_reports")
    op.drop_table("usage_rollups_hourly")
    op.drop_table("usage_records")
