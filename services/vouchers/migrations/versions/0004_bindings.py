"""Bindings: the tenants a voucher's holder lets it pay for, and their history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "bindings",
        sa.Column("voucher_code", sa.String(32), nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", Ts, nullable=True),
        sa.Column("authorised_at", Ts, nullable=True),
        sa.Column("withdrawn_at", Ts, nullable=True),
        sa.Column("updated_at", Ts, nullable=False),
        sa.CheckConstraint(
            "status IN ('requested', 'authorised', 'withdrawn')",
            name=op.f("ck_bindings_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["voucher_code"],
            ["vouchers.code"],
            name=op.f("fk_bindings_voucher_code_vouchers"),
        ),
        sa.PrimaryKeyConstraint(
            "voucher_code", "datacenter_id", "tenant_id", name=op.f("pk_bindings")
        ),
    )
    op.create_table(
        "binding_changes",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("voucher_code", sa.String(32), nullable=False),
        sa.Column("datacenter_id", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=True),
        sa.Column("changed_at", Ts, nullable=False),
        sa.ForeignKeyConstraint(
            ["voucher_code"],
            ["vouchers.code"],
            name=op.f("fk_binding_changes_voucher_code_vouchers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_binding_changes")),
        sa.UniqueConstraint("event_id", name=op.f("uq_binding_changes_event_id")),
    )
    op.create_index(
        "ix_binding_changes_binding",
        "binding_changes",
        ["voucher_code", "datacenter_id", "tenant_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_binding_changes_binding", table_name="binding_changes")
    op.drop_table("binding_changes")
    op.drop_table("bindings")
