"""Alembic environment of metering: its own history and version table."""

from services.common.migrations import run_env
from services.metering.models import Base

run_env(Base.metadata, "alembic_version_metering")
