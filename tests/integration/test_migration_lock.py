"""Copies of a service starting together on a fresh database (competing
consumers): every one migrates without error and the schema is built once."""

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from services.common.db import make_engine

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_starts_migrate_once(backend, sqlite_url, pg_url_factory):
    url = sqlite_url if backend == "sqlite" else pg_url_factory("race")
    code = (
        "import sys; from services.common.migrations import upgrade; "
        "upgrade('metering', sys.argv[1])"
    )
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(4)
    ]
    outputs = [start.communicate(timeout=120)[0].decode() for start in starts]
    assert [start.returncode for start in starts] == [0, 0, 0, 0], outputs
    engine = make_engine(url)
    try:
        tables = inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert {"usage_records", "alembic_version_metering"} <= set(tables)
