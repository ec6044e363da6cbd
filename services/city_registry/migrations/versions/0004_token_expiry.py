"""city_registry: tokens get a public id, an expiry and their last use.

Tokens issued before this revision get an id and **no expiry** (null): they
were handed out (cities' admin tokens, data centres' tokens, the local run's
credentials) with no notion of one, and giving them the default now would
lock their holders out on a day nobody announced. They are listed with
``expires_at`` null at ``GET /api/v1/tokens``, so the national admin can find
them, issue new ones and revoke them one by one.

Revision ID: 0004
Revises: 0003
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _utc():
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("tokens", sa.Column("id", sa.String(32), nullable=True))
    op.add_column("tokens", sa.Column("expires_at", _utc(), nullable=True))
    op.add_column("tokens", sa.Column("last_used_at", _utc(), nullable=True))
    tokens = sa.table("tokens", sa.column("token_sha256"), sa.column("id"))
    connection = op.get_bind()
    digests = connection.execute(sa.select(tokens.c.token_sha256)).scalars().all()
    for digest in digests:
        connection.execute(
            tokens.update()
            .where(tokens.c.token_sha256 == digest)
            .values(id=f"tok_{secrets.token_hex(8)}")
        )
    with op.batch_alter_table("tokens") as batch:
        batch.alter_column("id", existing_type=sa.String(32), nullable=False)
        batch.create_unique_constraint("uq_tokens_id", ["id"])
        batch.create_index("ix_tokens_role", ["role"])


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_index("ix_tokens_role")
        batch.drop_constraint("uq_tokens_id", type_="unique")
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
        batch.drop_column("id")
