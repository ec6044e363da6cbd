"""usage_totals: all-time usage per data centre, kept at ingest.

The overview summed every hourly rollup ever written for its all-time
figures, a cost that grows with history (a year of a national network is
hundreds of millions of rollups). The totals are now kept by the
transactions that move the rollups; this migration fills them from the
rollups already written (stripe 0).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_totals",
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("stripe", sa.Integer(), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("gpu_seconds", sa.BigInteger(), nullable=False),
        sa.Column("cost_fen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("datacenter_id", "stripe", name="pk_usage_totals"),
    )
    op.execute(
        "INSERT INTO usage_totals"
        " (datacenter_id, stripe, records, gpu_seconds, cost_fen)"
        " SELECT datacenter_id, 0, sum(records), sum(gpu_seconds), sum(cost_fen)"
        " FROM usage_rollups_hourly GROUP BY datacenter_id"
    )


def downgrade() -> None:
    op.drop_table("usage_totals")
