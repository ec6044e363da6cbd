"""usage_records' corrections index holds corrections only.

Every stored record is asked "does a stored record correct it?" through the
index on (datacenter_id, correction_of). It held an entry for every record,
nearly all with no ``correction_of``: one more B-tree insert per record on
the hot path, and a third of the table's index size, for entries no lookup
can match (``x = NULL`` is never true). Partial, it holds the corrections
alone; both lookups say ``correction_of IS NOT NULL``, so PostgreSQL and
SQLite alike may use it.

On a large table, build the new index by hand first (``CREATE INDEX
CONCURRENTLY ix_usage_records_corrections_new … WHERE correction_of IS NOT
NULL``, then drop the old one and rename) to avoid holding the table's write
lock while it builds; this migration does it in one transaction.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

INDEX = "ix_usage_records_datacenter_id_correction_of"


def upgrade() -> None:
    op.drop_index(INDEX, table_name="usage_records")
    op.create_index(
        INDEX,
        "usage_records",
        ["datacenter_id", "correction_of"],
        postgresql_where=sa.text("correction_of IS NOT NULL"),
        sqlite_where=sa.text("correction_of IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="usage_records")
    op.create_index(INDEX, "usage_records", ["datacenter_id", "correction_of"])
