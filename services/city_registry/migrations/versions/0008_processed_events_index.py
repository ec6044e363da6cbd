"""city_registry: processed_events by processed_at (issue 16 item 6).

The retention prunes the oldest claims first; without this index each of its
batches would scan the table from its start (services/city_registry/
retention.py).

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_processed_events_processed_at", "processed_events", ["processed_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_processed_events_processed_at", table_name="processed_events")
