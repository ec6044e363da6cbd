"""Alembic environment of the voucher service (one history per service)."""

from services.common.migrations import run_env
from services.vouchers.models import Base

run_env(Base.metadata, version_table="alembic_version_vouchers")
