"""metering: the indexes the retention prunes by (issue 16 item 6).

The pruner asks for the oldest rows by time (``services/metering/retention.py``):
without an index each of its batches would scan the table from its start,
over the rows earlier batches deleted and vacuum has not yet reclaimed, and
its transactions would grow with the backlog. B-trees, not BRIN: a B-tree
scan marks the dead entries it meets, so the next batch skips them.

The hold tables get one more entry per insert (a timestamp). This migration
builds the indexes in one transaction, holding each table's write lock while
it builds; on a large database build them by hand first (``CREATE INDEX
CONCURRENTLY``, the names below), then stamp this revision.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_capacity_buckets_hour", "capacity_buckets", "hour"),
    ("ix_capacity_claims_hour", "capacity_claims", "hour"),
    ("ix_gpu_claims_ended_at", "gpu_claims", "ended_at"),
    ("ix_dead_letters_received_at", "dead_letters", "received_at"),
)


def upgrade() -> None:
    for name, table, column in INDEXES:
        op.create_index(name, table, [column])


def downgrade() -> None:
    for name, table, _column in INDEXES:
        op.drop_index(name, table_name=table)
