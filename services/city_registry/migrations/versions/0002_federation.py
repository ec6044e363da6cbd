"""city_registry: admission and removal, vouchers closed, programs' terms.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _utc():
    return sa.DateTime(timezone=True)


def _counter():
    return sa.Column(
        "vouchers_closed", sa.Integer(), nullable=False, server_default="0"
    )


def upgrade() -> None:
    op.add_column("cities", _counter())
    op.add_column("cities", sa.Column("admitted_at", _utc(), nullable=True))
    op.add_column("cities", sa.Column("removed_at", _utc(), nullable=True))
    op.add_column("programs", _counter())
    op.add_column("programs", sa.Column("terms", sa.JSON(), nullable=True))
    op.add_column("vouchers", sa.Column("released_at", _utc(), nullable=True))
    op.add_column("datacenters", sa.Column("removed_at", _utc(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datacenters") as batch:
        batch.drop_column("removed_at")
    with op.batch_alter_table("vouchers") as batch:
        batch.drop_column("released_at")
    with op.batch_alter_table("programs") as batch:
        batch.drop_column("terms")
        batch.drop_column("vouchers_closed")
    with op.batch_alter_table("cities") as batch:
        batch.drop_column("removed_at")
        batch.drop_column("admitted_at")
        batch.drop_column("vouchers_closed")
