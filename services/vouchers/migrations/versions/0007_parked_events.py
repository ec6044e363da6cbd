"""vouchers: usage-queue messages set aside (issue 16, bounded retries).

``parked_events``, as the registry's: a ``usage_rated``, ``binding_requested``
or ``usage_hold`` not of the contract, or failing ``MAX_DELIVERY_ATTEMPTS``
times, is kept whole with its reason, listed and replayed by an operator,
instead of a batch requeued forever (stalling every booking behind it) or
a message dropped with a log line.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from alembic import op

from services.common.parking_store import (
    create_parked_events_table,
    drop_parked_events_table,
)

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_parked_events_table(op)


def downgrade() -> None:
    drop_parked_events_table(op)
