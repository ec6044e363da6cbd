"""city_registry: cities' refusals, holds and clawbacks (issue 15).

``city_refusals`` (``usage_refused``: the latest refusal of each record, and
what a replay came to), ``city_holds`` (``usage_held``, ``usage_released``)
and ``city_clawbacks`` (``voucher_clawed_back``): listed beside metering's
dead letters and counted per data centre and reason.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _utc():
    return sa.DateTime(timezone=True)


def _id():
    return sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)


def upgrade() -> None:
    op.create_table(
        "city_refusals",
        _id(),
        sa.Column("city_code", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(512), nullable=False),
        sa.Column("refused_at", _utc(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.Column("replayed_at", _utc(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.UniqueConstraint("city_code", "datacenter_id", "record_id"),
    )
    op.create_index(
        "ix_city_refusals_datacenter_id",
        "city_refusals",
        ["datacenter_id", "refused_at"],
    )
    op.create_index("ix_city_refusals_refused_at", "city_refusals", ["refused_at"])
    op.create_table(
        "city_holds",
        _id(),
        sa.Column("city_code", sa.String(64), nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("subsidy_fen", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("held_at", _utc(), nullable=False),
        sa.Column("decided_at", _utc(), nullable=True),
        sa.Column("decided_by", sa.String(128), nullable=True),
        sa.Column("decision_reason", sa.String(512), nullable=True),
        sa.Column("released_fen", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("city_code", "datacenter_id", "record_id"),
    )
    op.create_index(
        "ix_city_holds_datacenter_id", "city_holds", ["datacenter_id", "held_at"]
    )
    op.create_index("ix_city_holds_held_at", "city_holds", ["held_at"])
    op.create_table(
        "city_clawbacks",
        _id(),
        sa.Column("city_code", sa.String(64), nullable=False),
        sa.Column("voucher_code", sa.String(64), nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("clawed_back_fen", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("clawed_back_at", _utc(), nullable=False),
    )
    op.create_index(
        "ix_city_clawbacks_datacenter_id", "city_clawbacks", ["datacenter_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_city_clawbacks_datacenter_id", table_name="city_clawbacks")
    op.drop_table("city_clawbacks")
    op.drop_index("ix_city_holds_held_at", table_name="city_holds")
    op.drop_index("ix_city_holds_datacenter_id", table_name="city_holds")
    op.drop_table("city_holds")
    op.drop_index("ix_city_refusals_refused_at", table_name="city_refusals")
    op.drop_index("ix_city_refusals_datacenter_id", table_name="city_refusals")
    op.drop_table("city_refusals")
