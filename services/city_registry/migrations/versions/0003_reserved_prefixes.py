"""city_registry: voucher prefixes reserved, one city each; a data centre's
city optional.

Prefixes held before this revision are kept as the cities' reservations; were
two cities holding the same one, the one that holds it since longest keeps it
and the other is assigned a new one when it is next seeded or admitted.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UNIQUE = "uq_cities_voucher_prefix"


def upgrade() -> None:
    cities = sa.table(
        "cities",
        sa.column("code", sa.String),
        sa.column("voucher_prefix", sa.String),
        sa.column("created_at", sa.DateTime),
    )
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(cities.c.code, cities.c.voucher_prefix)
        .where(cities.c.voucher_prefix.is_not(None))
        .order_by(cities.c.created_at, cities.c.code)
    ).all()
    held: set[str] = set()
    for code, prefix in rows:
        if prefix in held:
            connection.execute(
                sa.update(cities)
                .where(cities.c.code == code)
                .values(voucher_prefix=None)
            )
        held.add(prefix)
    with op.batch_alter_table("cities") as batch:
        batch.create_unique_constraint(UNIQUE, ["voucher_prefix"])
    with op.batch_alter_table("datacenters") as batch:
        batch.alter_column("city", existing_type=sa.String(64), nullable=True)


def downgrade() -> None:
    op.execute("UPDATE datacenters SET city = '' WHERE city IS NULL")
    with op.batch_alter_table("datacenters") as batch:
        batch.alter_column("city", existing_type=sa.String(64), nullable=False)
    with op.batch_alter_table("cities") as batch:
        batch.drop_constraint(UNIQUE, type_="unique")
