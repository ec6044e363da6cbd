"""Holds (issue 15): the GPUs a record names, why it is held, and the
per-hour capacity buckets and GPU claims the checks read.

Records stored before have no GPUs and no hold (nothing to fill); their
GPU-seconds are not in the new buckets, so the capacity check starts from
the records stored from this revision on (documented in docs/metering.md).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("gpu_uuids", sa.Text(), nullable=True))
    op.add_column("usage_records", sa.Column("hold", sa.Text(), nullable=True))
    op.create_table(
        "capacity_buckets",
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("gpu_model", sa.String(64), nullable=False),
        sa.Column("hour", _TS, nullable=False),
        sa.Column("gpu_seconds", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "datacenter_id", "gpu_model", "hour", name="pk_capacity_buckets"
        ),
    )
    op.create_table(
        "capacity_claims",
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("gpu_model", sa.String(64), nullable=False),
        sa.Column("hour", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("gpu_seconds", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "datacenter_id",
            "gpu_model",
            "hour",
            "started_at",
            "record_id",
            name="pk_capacity_claims",
        ),
    )
    op.create_table(
        "gpu_claims",
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("gpu_uuid", sa.String(128), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("ended_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint(
            "datacenter_id", "gpu_uuid", "started_at", "record_id", name="pk_gpu_claims"
        ),
    )


def downgrade() -> None:
    op.drop_table("gpu_claims")
    op.drop_table("capacity_claims")
    op.drop_table("capacity_buckets")
    op.drop_column("usage_records", "hold")
    op.drop_column("usage_records", "gpu_uuids")
