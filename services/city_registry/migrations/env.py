"""Alembic environment of city_registry: its own history and version table."""

from services.city_registry.models import Base
from services.common.migrations import run_env

run_env(Base.metadata, "alembic_version_city_registry")
