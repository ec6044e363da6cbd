"""metering: failed delivery attempts, so a poison message ends as a dead letter.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delivery_attempts",
        sa.Column("message_key", sa.String(64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_key", name="pk_delivery_attempts"),
    )


def downgrade() -> None:
    op.drop_table("delivery_attempts")
