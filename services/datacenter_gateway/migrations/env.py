"""Alembic environment of the data-centre gateway's outbox database."""

from services.common.migrations import run_env
from services.datacenter_gateway.outbox import Base

run_env(Base.metadata, "alembic_version_datacenter_gateway")
