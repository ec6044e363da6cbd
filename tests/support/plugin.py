"""The tests' pytest plugin: fixtures every ring shares (STYLE.md principle 8).

Registered by ``tests/conftest.py`` (``pytest_plugins``), so it is loaded for
``make test``, for one ring and for one file alike.

- nameko's own pytest plugin provides ``rabbit_config`` (a fresh RabbitMQ vhost
  per test, through the management API), ``container_factory`` and
  ``runner_factory``.
- ``pg_url_factory`` makes a fresh PostgreSQL database per call and drops it
  after; ``pg_url`` is one of them; ``sqlite_url`` is a file database in the
  test's tmp_path; ``metering_db`` and ``vouchers_db`` are migrated ones.
- ``metering`` runs the metering service (its config in ``metering_config``,
  which a module may override) beside ``registry_stand_in``.
- ``federation`` is a test queue seeing what the city of Shanghai publishes.
"""

import os

import eventlet

eventlet.monkey_patch()  # nameko containers in integration tests need it
# As in services/common/runner.py: let psycopg yield to eventlet's hub.
os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_select")

import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import nameko  # noqa: E402
import psycopg  # noqa: E402
import pytest  # noqa: E402
from kombu import Connection, Queue, binding  # noqa: E402
from kombu.simple import SimpleQueue  # noqa: E402

from services.common.amqp import FEDERATION_EXCHANGE  # noqa: E402
from services.common.config import (  # noqa: E402
    AMQP_URI,
    DATABASE_URL,
    REGISTRY_CACHE_TTL_S,
)
from services.common.migrations import upgrade  # noqa: E402
from services.metering.service import MeteringService  # noqa: E402
from tests.support.metering_data import StandInRegistry  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin_connection():
    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)


@pytest.fixture
def pg_url_factory() -> Iterator[Callable[[str], str]]:
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
def pg_url(pg_url_factory) -> str:
    """A new, empty PostgreSQL database, dropped after the test."""
    return pg_url_factory()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A SQLite file database in the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'test.db'}"


def _migrated(pg_url_factory, service: str) -> str:
    url = pg_url_factory(service)
    upgrade(service, url)
    return url


@pytest.fixture
def metering_db(pg_url_factory) -> str:
    """A PostgreSQL database with metering's schema."""
    return _migrated(pg_url_factory, "metering")


@pytest.fixture
def vouchers_db(pg_url_factory) -> str:
    """A PostgreSQL database with a city's voucher schema."""
    return _migrated(pg_url_factory, "vouchers")


@pytest.fixture
def registry_stand_in(rabbit_config, container_factory) -> str:
    """city_registry replaced by :class:`StandInRegistry`; its AMQP URI."""
    container_factory(StandInRegistry).start()
    return nameko.config[AMQP_URI]


@pytest.fixture
def metering_config(metering_db) -> dict:
    """The config the ``metering`` fixture runs with (override to change it)."""
    return {DATABASE_URL: metering_db, REGISTRY_CACHE_TTL_S: 30}


@pytest.fixture
def metering(registry_stand_in, metering_config, container_factory) -> Iterator[str]:
    """metering running in a container beside the stand-in; its AMQP URI."""
    with nameko.config.patch(metering_config):
        container_factory(MeteringService).start()
        yield registry_stand_in


@pytest.fixture
def federation(rabbit_config) -> Iterator[tuple[Connection, SimpleQueue]]:
    """``(connection, queue)``: a test queue seeing everything Shanghai
    publishes on ``computenet.federation``."""
    with Connection(nameko.config[AMQP_URI]) as connection:
        queue = Queue(
            "test.federation",
            bindings=[binding(FEDERATION_EXCHANGE, routing_key="shanghai.#")],
        )
        queue(connection.channel()).declare()
        simple = SimpleQueue(connection, queue)
        yield connection, simple
        simple.close()
