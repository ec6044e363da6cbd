"""metering's lookups of stored records seek an index, whatever the table's size.

Every batch asks which stored records correct the ones it inserts (on SQLite
by a query of its own; on PostgreSQL inside the insert), and a redelivered
batch asks for its stored records. Asked as a row value ``(datacenter_id, …)
IN (VALUES …)``, SQLite scanned the whole index for it on every batch: a cost
that grew with each record ever stored. Here the queries metering sends are
captured and explained on a table of many records, on both databases, and
must not scan ``usage_records``; their answers are checked too.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from services.common.db import make_engine
from services.common.migrations import upgrade
from services.metering import store

pytestmark = pytest.mark.integration

RECORDS = 20_000
EVERY = 100  # one record in EVERY corrects the one before it


def _fill(engine) -> None:
    """RECORDS records of two data centres; ``r-n`` (n a multiple of EVERY)
    corrects ``r-(n-1)``."""
    columns = (
        "datacenter_id, record_id, record_sha256, tenant_id, gpu_model, gpu_count,"
        " started_at, ended_at, gpu_seconds, source, correction_of, cost_fen,"
        " unit_price_fen_per_gpu_hour, government_run, hub_region, chip_origin,"
        " rated_at"
    )
    rows = [
        {
            "dc": f"dc-{n % 2}",
            "rid": f"r-{n}",
            "corr": f"r-{n - 1}" if n % EVERY == 0 else None,
            "at": "2026-12-01 00:00:00+00:00",
        }
        for n in range(1, RECORDS + 1)
    ]
    with engine.begin() as connection:
        connection.execute(
            text(
                f"INSERT INTO usage_records ({columns}) VALUES (:dc, :rid, 'x',"
                " 't', 'H100', 1, :at, :at, 60, 'slurm', :corr, 1, 100,"
                " true, 'west', 'imported', :at)"
            ),
            rows,
        )
        connection.exec_driver_sql("ANALYZE")


def _plans(engine, run) -> tuple[object, list[str]]:
    """``run(session)``'s result and the plan of every SELECT it sent."""
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            result = run(session)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert sent, "no query was sent"
    explain = (
        "EXPLAIN " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    )
    plans = []
    with engine.connect() as connection:
        for statement, parameters in sent:
            rows = connection.exec_driver_sql(explain + statement, parameters)
            plans.append("\n".join(str(row[-1]) for row in rows))
    return result, plans


def _scans_the_table(plan: str) -> bool:
    return "Seq Scan on usage_records" in plan or "SCAN usage_records" in plan


@pytest.fixture(params=["sqlite", "postgresql"])
def filled(request, sqlite_url, pg_url_factory):
    url = sqlite_url if request.param == "sqlite" else pg_url_factory("lookups")
    upgrade("metering", url)
    engine = make_engine(url)
    _fill(engine)
    yield engine
    engine.dispose()


def test_corrections_are_found_by_index_seeks(filled):
    # r-100 and r-200 (both of dc-0) correct r-99 and r-199; dc-1 has none
    keys = [("dc-0", "r-99"), ("dc-0", "r-199"), ("dc-1", "r-99"), ("dc-0", "r-1")]
    pairs, plans = _plans(filled, lambda s: store._corrections_of(s, keys))
    assert sorted(pairs) == [
        (("dc-0", "r-100"), ("dc-0", "r-99")),
        (("dc-0", "r-200"), ("dc-0", "r-199")),
    ]
    assert not any(map(_scans_the_table, plans)), plans


def test_stored_records_are_found_by_index_seeks(filled):
    keys = [("dc-1", "r-1"), ("dc-0", "r-2"), ("dc-0", "r-3"), ("dc-1", "nowhere")]
    rows, plans = _plans(filled, lambda s: store.stored_rows(s, keys))
    assert sorted(rows) == [("dc-0", "r-2"), ("dc-1", "r-1")]
    assert rows[("dc-0", "r-2")]["record_id"] == "r-2"
    assert not any(map(_scans_the_table, plans)), plans


def test_the_corrections_index_holds_corrections_only(filled):
    """Records that correct nothing (nearly all) add no entry to it."""
    with filled.connect() as connection:
        if filled.dialect.name == "postgresql":
            predicate = connection.exec_driver_sql(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE"
                " indexrelid = 'ix_usage_records_datacenter_id_correction_of'"
                "::regclass"
            ).scalar_one()
        else:
            predicate = connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name ="
                " 'ix_usage_records_datacenter_id_correction_of'"
            ).scalar_one()
    assert "correction_of IS NOT NULL" in predicate
