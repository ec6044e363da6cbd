"""Corrections looked up through a partial index led by ``correction_of``.

The index on (datacenter_id, correction_of) held a row for every redemption
(nearly all without a correction) and, on a table without statistics yet,
let PostgreSQL answer a lookup of one record by scanning the data centre's
whole prefix. This one holds corrections only and cannot be used that way.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_redemptions_correction_of", table_name="redemptions")
    op.create_index(
        "ix_redemptions_correction_of",
        "redemptions",
        ["correction_of", "datacenter_id"],
        postgresql_where=sa.text("correction_of IS NOT NULL"),
        sqlite_where=sa.text("correction_of IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_redemptions_correction_of", table_name="redemptions")
    op.create_index(
        "ix_redemptions_correction_of",
        "redemptions",
        ["datacenter_id", "correction_of"],
    )
