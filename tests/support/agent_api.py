"""A data centre's agent API (CONTRACTS.md §6) over a SQLite outbox in the
test's tmp_path, no broker: a pytest plugin, registered by ``tests/conftest.py``.

Shared by the gateway's unit tests and the security ring (``tests/security``):
``outbox``, ``settings`` (the process's configuration), ``make_client(**
overrides)`` (a test client of ``create_app`` over them) and ``record_factory``
(a valid agent record, random ids). A test module or folder with an ``outbox``
of its own (PostgreSQL, or the vouchers service's) defines it there.
"""

import uuid
from datetime import timedelta

import pytest

from services.common.config import AGENT_TOKEN, DATACENTER_ID, KEY_ID, MAX_BACKLOG
from services.common.db import make_engine
from services.common.migrations import upgrade
from services.common.units import format_ts, utcnow
from services.common.vouchercode import generate
from services.datacenter_gateway.app import create_app
from services.datacenter_gateway.domain import InventoryItem
from services.datacenter_gateway.outbox import Outbox

DC = "guian-gov-01"
INVENTORY = [InventoryItem("H800", 256), InventoryItem("Ascend-910B", 512)]


@pytest.fixture
def outbox(sqlite_url):
    upgrade("datacenter_gateway", sqlite_url)
    box = Outbox(make_engine(sqlite_url), backlog_cache_s=0)
    yield box
    box.close()


@pytest.fixture
def settings():
    return {DATACENTER_ID: DC, KEY_ID: "k1", AGENT_TOKEN: "", MAX_BACKLOG: 1000}


@pytest.fixture
def make_client(outbox, settings):
    def make(**overrides):
        app = create_app({**settings, **overrides}, outbox, inventory=INVENTORY)
        return app.test_client()

    return make


def agent_records(n: int, prefix: str = "it") -> list[dict]:
    """``n`` finished half-hour jobs of tenant acme on 2 H800, as an agent
    posts them to ``/v1/usage`` (the integration rings' records)."""
    ended = utcnow() - timedelta(minutes=1)
    return [
        {
            "record_id": f"{prefix}-{uuid.uuid4().hex}",
            "tenant_id": "acme",
            "gpu_model": "H800",
            "gpu_count": 2,
            "started_at": format_ts(ended - timedelta(minutes=30)),
            "ended_at": format_ts(ended),
            "gpu_seconds": 3000,
            "source": "simulated",
        }
        for _ in range(n)
    ]


@pytest.fixture
def record_factory():
    """``record_factory(gpu_count=8)`` → a valid agent record, random ids."""

    def make(**overrides):
        ended = utcnow() - timedelta(minutes=1)
        started = ended - timedelta(hours=1)
        record = {
            "record_id": f"r-{uuid.uuid4().hex}",
            "tenant_id": "acme",
            "gpu_model": "H800",
            "gpu_count": 8,
            "started_at": format_ts(started),
            "ended_at": format_ts(ended),
            "gpu_seconds": 8 * 3000,
            "source": "slurm",
            "job_id": "42",
        }
        record.update(overrides)
        return record

    return make


@pytest.fixture
def voucher_code():
    return generate("SH")
