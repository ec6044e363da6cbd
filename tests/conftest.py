"""Fixtures shared by every ring of tests (STYLE.md principle 8).

- nameko's own pytest plugin provides ``rabbit_config`` (a fresh RabbitMQ vhost
  per test, through the management API), ``container_factory`` and
  ``runner_factory``.
- ``pg_url`` makes a fresh PostgreSQL database per call and drops it after.
- ``sqlite_url`` is a file database in the test's tmp_path.
"""

import os

import eventlet

eventlet.monkey_patch()  # nameko containers in integration tests need it
# As in services/common/runner.py: let psycopg yield to eventlet's hub.
os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_select")

import uuid  # noqa: E402

import psycopg  # noqa: E402
import pytest  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin_connection():
    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)


@pytest.fixture
def pg_url_factory():
    """``pg_url_factory("metering")`` → URL of a new, empty PostgreSQL database."""
    created: list[str] = []
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]

    def make(hint: str = "db") -> str:
        name = f"cn_test_{hint}_{uuid.uuid4().hex[:10]}"
        with _admin_connection() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"{base}/{name}"

    yield make
    with _admin_connection() as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_url_factory):
    return pg_url_factory()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'test.db'}"
