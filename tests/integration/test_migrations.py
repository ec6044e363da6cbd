"""Each service's Alembic history builds exactly the schema its models declare,
on SQLite (the embedded default) and PostgreSQL (deployment) alike, and
downgrades cleanly: a model changed without a migration fails here."""

import importlib

import pytest
from sqlalchemy import inspect

from services.common.db import make_engine
from services.common.migrations import upgrade
from tests.support.schema import schema_drift

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
        diff = schema_drift(engine, metadata, service)
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


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_metering_totals_start_from_the_rollups_already_written(
    backend, sqlite_url, pg_url_factory
):
    """Migration 0005 fills usage_totals from the existing hourly rollups."""
    from sqlalchemy import text

    url = sqlite_url if backend == "sqlite" else pg_url_factory("totals")
    upgrade("metering", url, "0004")
    engine = make_engine(url)
    buckets = [
        ("dc-a", "shanghai", "t1", "SH-1", "H100", "2026-12-01 00:00:00", 2, 7200, 90),
        ("dc-a", "shanghai", "t2", "SH-2", "H100", "2026-12-01 01:00:00", 1, 60, 5),
        ("dc-b", "", "t3", "", "A800", "2026-12-01 00:00:00", 3, 900, 40),
    ]
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO usage_rollups_hourly (datacenter_id, city,"
                    " tenant_id, voucher_code, gpu_model, hour, records,"
                    " gpu_seconds, cost_fen) VALUES (:dc, :city, :tenant, :code,"
                    " :model, :hour, :records, :seconds, :cost)"
                ),
                [
                    dict(
                        zip(
                            ("dc", "city", "tenant", "code", "model", "hour")
                            + ("records", "seconds", "cost"),
                            bucket,
                            strict=True,
                        )
                    )
                    for bucket in buckets
                ],
            )
        upgrade("metering", url)
        with engine.connect() as connection:
            kept = connection.execute(
                text(
                    "SELECT datacenter_id, stripe, records, gpu_seconds, cost_fen"
                    " FROM usage_totals ORDER BY datacenter_id"
                )
            ).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in kept] == [
        ("dc-a", 0, 3, 7260, 95),
        ("dc-b", 0, 3, 900, 40),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_registry_prefixes_held_twice_are_kept_by_the_oldest_holder(
    backend, sqlite_url, pg_url_factory
):
    """Migration 0003 makes prefixes unique: a duplicate is cleared."""
    from sqlalchemy import text

    url = sqlite_url if backend == "sqlite" else pg_url_factory("prefixes")
    upgrade("city_registry", url, "0002")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for code, prefix, at in [
                ("shanghai", "SH", "2025-01-01 00:00:00+00"),
                ("squatter", "SH", "2025-02-01 00:00:00+00"),
                ("chengdu", "CD", "2025-03-01 00:00:00+00"),
            ]:
                connection.execute(
                    text(
                        "INSERT INTO cities (code, name, voucher_prefix, created_at,"
                        " committed_fen, redeemed_fen, released_fen, vouchers_issued)"
                        " VALUES (:code, :code, :prefix, :at, 0, 0, 0, 0)"
                    ),
                    {"code": code, "prefix": prefix, "at": at},
                )
        upgrade("city_registry", url)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT code, voucher_prefix FROM cities"))
            held = {code: prefix for code, prefix in rows}
        assert held == {"shanghai": "SH", "squatter": None, "chengdu": "CD"}
    finally:
        engine.dispose()
