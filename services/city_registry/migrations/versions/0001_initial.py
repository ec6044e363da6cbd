"""city_registry: cities, programs, vouchers, processed events, data centres,
keys and tokens.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _utc():
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "cities",
        sa.Column("code", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("region", sa.String(64), nullable=True),
        sa.Column("voucher_prefix", sa.String(8), nullable=True),
        sa.Column("last_heartbeat_at", _utc(), nullable=True),
        sa.Column("committed_fen", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_fen", sa.BigInteger(), nullable=False),
        sa.Column("released_fen", sa.BigInteger(), nullable=False),
        sa.Column("vouchers_issued", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
    )
    op.create_table(
        "programs",
        sa.Column(
            "city_code",
            sa.String(64),
            sa.ForeignKey("cities.code"),
            primary_key=True,
        ),
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=True),
        sa.Column("budget_fen", sa.BigInteger(), nullable=False),
        sa.Column("rate_bp", sa.Integer(), nullable=True),
        sa.Column("rules_version", sa.String(64), nullable=True),
        sa.Column("rules_sha256", sa.String(64), nullable=True),
        sa.Column("committed_fen", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_fen", sa.BigInteger(), nullable=False),
        sa.Column("released_fen", sa.BigInteger(), nullable=False),
        sa.Column("vouchers_issued", sa.Integer(), nullable=False),
    )
    op.create_table(
        "vouchers",
        sa.Column("code", sa.String(64), primary_key=True),
        sa.Column("city_code", sa.String(64), nullable=False),
        sa.Column("program_id", sa.String(128), nullable=False),
    )
    op.create_table(
        "processed_events",
        sa.Column("city_code", sa.String(64), primary_key=True),
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("processed_at", _utc(), nullable=False),
    )
    op.create_table(
        "datacenters",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("operator", sa.String(200), nullable=False),
        sa.Column("city", sa.String(64), nullable=False),
        sa.Column("hub_region", sa.String(64), nullable=False),
        sa.Column("government_run", sa.Boolean(), nullable=False),
        sa.Column("inventory", sa.JSON(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
    )
    op.create_table(
        "datacenter_keys",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(100), nullable=False, unique=True),
        sa.Column(
            "datacenter_id",
            sa.String(64),
            sa.ForeignKey("datacenters.id"),
            nullable=False,
        ),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("revoked_at", _utc(), nullable=True),
    )
    op.create_index(
        "ix_datacenter_keys_datacenter_id", "datacenter_keys", ["datacenter_id"]
    )
    op.create_table(
        "tokens",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(300), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("revoked_at", _utc(), nullable=True),
    )


def downgrade() -> None:
    op.drop_index("ix_datacenter_keys_datacenter_id", "datacenter_keys")
    for table in (
        "tokens",
        "datacenter_keys",
        "datacenters",
        "processed_events",
        "vouchers",
        "programs",
        "cities",
    ):
        op.drop_table(table)
