"""Manual review, voucher closing (expiry and revocation), the event outbox.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("applications") as batch:
        batch.add_column(sa.Column("reviewed_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("reviewed_at", Ts, nullable=True))
        batch.add_column(sa.Column("review_reason", sa.String(512), nullable=True))
    with op.batch_alter_table("vouchers") as batch:
        batch.add_column(sa.Column("closed_at", Ts, nullable=True))
        batch.add_column(sa.Column("closed_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("close_reason", sa.String(512), nullable=True))
    op.create_index(
        "ix_vouchers_status_expires_at", "vouchers", ["status", "expires_at"]
    )
    op.create_index("ix_vouchers_company_id", "vouchers", ["company_id"])
    op.create_table(
        "outbox",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("published_at", Ts, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_id")),
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        postgresql_where=sa.text("published_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_vouchers_company_id", table_name="vouchers")
    op.drop_index("ix_vouchers_status_expires_at", table_name="vouchers")
    with op.batch_alter_table("vouchers") as batch:
        batch.drop_column("close_reason")
        batch.drop_column("closed_by")
        batch.drop_column("closed_at")
    with op.batch_alter_table("applications") as batch:
        batch.drop_column("review_reason")
        batch.drop_column("reviewed_at")
        batch.drop_column("reviewed_by")
