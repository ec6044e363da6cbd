"""metering: messages set aside after failing to apply (issue 16).

``parked_events``, as the registry's and the cities', with the message's
headers (its signature) and properties (its publisher), so that a replay
checks it again as it came: a message that passed every check but failed
``MAX_DELIVERY_ATTEMPTS`` times on its own is parked here instead of
becoming a ``processing_error`` dead letter (the platform's fault, not the
data centre's).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from services.common.parking_store import (
    create_parked_events_table,
    drop_parked_events_table,
)

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_parked_events_table(
        op,
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("properties", sa.JSON(), nullable=True),
    )


def downgrade() -> None:
    drop_parked_events_table(op)
