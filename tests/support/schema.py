"""Does a service's Alembic history build exactly what its models declare?"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData


def schema_drift(engine: Engine, metadata: MetaData, service: str) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match
    ``metadata``: empty when the migrations build exactly the models."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"version_table": f"alembic_version_{service}", "compare_type": True},
        )
        return [
            change
            for change in compare_metadata(context, metadata)
            # the version table belongs to Alembic, not to the models
            if not (
                change[0] == "remove_table"
                and change[1].name.startswith("alembic_version")
            )
        ]
