"""city_registry: onboarding that a failed broker grant cannot strand.

``credentials_pending_since`` on ``cities`` and ``datacenters``: set in the
transaction that admits a city or registers a data centre, cleared once its
broker user is granted and its token issued. Admitting or registering it
again while it is set completes the onboarding (new password, key and token;
what the failed try issued is revoked) instead of answering 409. Rows from
before this revision are null: onboarded (or seeded) already.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("cities", "datacenters"):
        op.add_column(
            table,
            sa.Column(
                "credentials_pending_since", sa.DateTime(timezone=True), nullable=True
            ),
        )


def downgrade() -> None:
    for table in ("cities", "datacenters"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("credentials_pending_since")
