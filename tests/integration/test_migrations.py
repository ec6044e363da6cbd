"""Each service's Alembic history builds exactly the schema its models declare,
on SQLite (the embedded default) and PostgreSQL (deployment) alike, and
downgrades cleanly: a model changed without a migration fails here."""

import importlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from services.common.db import make_engine
from services.common.migrations import upgrade

pytestmark = pytest.mark.integration

MODELS = {
    "city_registry": "services.city_registry.models",
    "metering": "services.metering.models",
    "vouchers": "services.vouchers.models",
    "datacenter_gateway": "services.datacenter_gateway.outbox",
}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("service", sorted(MODELS))
def test_migrations_match_models(service, backend, sqlite_url, pg_url_factory):
    url = sqlite_url if backend == "sqlite" else pg_url_factory(service)
    metadata = importlib.import_module(MODELS[service]).Base.metadata
    upgrade(service, url)
    upgrade(service, url)  # idempotent on restart
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "version_table": f"alembic_version_{service}",
                    "compare_type": True,
                },
            )
            diff = [
                change
                for change in compare_metadata(context, metadata)
                # the version table belongs to Alembic, not to the models
                if not (
                    change[0] == "remove_table"
                    and change[1].name.startswith("alembic_version")
                )
            ]
        assert diff == [], diff
        tables = set(inspect(engine).get_table_names())
        assert set(metadata.tables) <= tables
        assert f"alembic_version_{service}" in tables
    finally:
        engine.dispose()


def test_sessions_are_in_utc_whatever_the_database_default(pg_url):
    """Hours are cut in the zone a timestamp comes back in: always UTC."""
    from datetime import timedelta

    import psycopg
    from sqlalchemy import text

    from services.common.db import make_engine

    with psycopg.connect(pg_url, autocommit=True) as conn:
        name = pg_url.rsplit("/", 1)[1]
        conn.execute(f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Shanghai'")
    with psycopg.connect(pg_url) as conn:  # the default really is not UTC
        assert conn.execute("SHOW timezone").fetchone()[0] == "Asia/Shanghai"
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW timezone")).scalar() == "UTC"
        at = conn.execute(text("SELECT timestamptz '2026-11-22 01:30:00+08'")).scalar()
    engine.dispose()
    assert at.utcoffset() == timedelta(0) and at.hour == 17
