"""Binding requests: each change of a tenant's voucher, to be published.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

import sqlalchemy as sa
from alembic import op

from services.common.sqltypes import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "binding_requests",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("voucher_code", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("requested_at", UtcDateTime(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=True),
        sa.Column("published_at", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_binding_requests"),
        sa.UniqueConstraint("request_id", name="uq_binding_requests_request_id"),
    )
    op.create_index(
        "ix_binding_requests_unpublished", "binding_requests", ["published_at", "id"]
    )
    op.create_index(
        "ix_binding_requests_tenant_id", "binding_requests", ["tenant_id", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_binding_requests_tenant_id", table_name="binding_requests")
    op.drop_index("ix_binding_requests_unpublished", table_name="binding_requests")
    op.drop_table("binding_requests")
