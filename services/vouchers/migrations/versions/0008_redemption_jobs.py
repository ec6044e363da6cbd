"""vouchers: the job on each redemption row (issue 17, monthly statements).

A voucher's monthly statement lists each subsidised job with its tenant, GPU
model and count and when it ran; the rated record carried them, but only its
money was kept. Nullable: rows booked before this migration have no job
details (the statement shows them blank), and nothing is back-filled from
another service's data.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Ts = sa.DateTime(timezone=True)
COLUMNS = (
    ("tenant_id", sa.String(128)),
    ("gpu_model", sa.String(64)),
    ("gpu_count", sa.Integer()),
    ("started_at", Ts),
    ("ended_at", Ts),
)


def upgrade() -> None:
    # Nullable, no default: on PostgreSQL each is a catalogue change only,
    # whatever the size of the table.
    with op.batch_alter_table("redemptions") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("redemptions") as batch:
        for name, _kind in reversed(COLUMNS):
            batch.drop_column(name)
