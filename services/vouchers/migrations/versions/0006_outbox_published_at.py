"""vouchers: the outbox by published_at (issue 16 item 6).

The retention prunes published events by when they were published
(services/vouchers/retention.py); without this index each of its batches
would scan the outbox from its start.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbox_published_at", "outbox", ["published_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_published_at", table_name="outbox")
