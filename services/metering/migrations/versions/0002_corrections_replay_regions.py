"""metering: corrections index, replayable dead letters, data-centre attributes.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_index(
        "ix_usage_records_datacenter_id_correction_of",
        "usage_records",
        ["datacenter_id", "correction_of"],
    )
    with op.batch_alter_table("dead_letters") as batch:
        batch.add_column(sa.Column("properties", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("replayed_at", Timestamp, nullable=True))
        batch.add_column(sa.Column("replay_outcome", sa.String(32), nullable=True))
        batch.add_column(sa.Column("replay_reason", sa.String(64), nullable=True))
    op.create_table(
        "metered_datacenters",
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("hub_region", sa.String(64), nullable=False),
        sa.Column("government_run", sa.Boolean(), nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("datacenter_id", name="pk_metered_datacenters"),
    )


def downgrade() -> None:
    op.drop_table("metered_datacenters")
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("replay_reason")
        batch.drop_column("replay_outcome")
        batch.drop_column("replayed_at")
        batch.drop_column("properties")
    op.drop_index(
        "ix_usage_records_datacenter_id_correction_of", table_name="usage_records"
    )
