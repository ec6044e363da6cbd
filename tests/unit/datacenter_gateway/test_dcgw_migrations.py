"""The hand-written migration creates exactly what the models declare."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from services.datacenter_gateway.outbox import Base


def test_migration_matches_models(outbox):
    with outbox.engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "version_table": "alembic_version_datacenter_gateway",
            },
        )
        assert compare_metadata(context, Base.metadata) == []
