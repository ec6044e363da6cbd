"""city_registry: federation events set aside (issue 16, bounded retries).

``parked_events``: an event rejected on arrival or failing ``MAX_ATTEMPTS``
times is kept whole with its reason, listed and replayed by an operator,
instead of being requeued forever or dropped with a log line.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

from services.common.parking_store import (
    create_parked_events_table,
    drop_parked_events_table,
)

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_parked_events_table(op)


def downgrade() -> None:
    drop_parked_events_table(op)
