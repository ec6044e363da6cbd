"""PostgreSQL restarted under a running network (issue 16, item 3).

Every process of ``make run`` (registry, metering, three cities, two
data-centre gateways, the portal) keeps its database on one PostgreSQL
server of the test's own (tests/support/private_postgres.py). Usage streams
through Gui'an's gateway; the server is restarted (fast mode: every open
connection cut) once while the gateway takes records and once while metering
and the city book the backlog. Then:

- the gateway answered 202 only for what it stored (a batch it could not
  store got a 5xx, and the agent sent it again: the same record ids);
- every GPU-second is counted once (the national summary, exact) and every
  subsidy booked once (the voucher and the registry's view of the city,
  exact to the fen), records re-sent after the restarts included;
- no process exited (the launcher stops the whole network if one does).
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
import requests

from tests.e2e.conftest import NETWORK_DATABASES
from tests.support.e2e_flow import cost_fen, make_records, shanghai_voucher
from tests.support.polling import eventually_over_http
from tests.support.private_postgres import PrivatePostgres

pytestmark = pytest.mark.e2e

GUIAN = "guian-gov-01"
H800_PRICE_FEN = 1800
SHANGHAI_RATE_BP_AT_GOVERNMENT_DC = 9000
RECORDS = 3000
BATCH = 100


@pytest.fixture
def postgres():
    server = PrivatePostgres()
    server.start()
    yield server
    server.stop()


def post_until_stored(gateway, batch, agent, deadline_s=90) -> int:
    """What an agent does: send the batch until the gateway answers 202
    (5xx and refused connections while the database is away). Returns how
    many answers were not 202."""
    failures = 0
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            response = requests.post(
                f"{gateway}/v1/usage", json=batch, headers=agent, timeout=30
            )
            if response.status_code == 202:
                return failures
            assert response.status_code >= 500, response.text  # never a 4xx
        except requests.ConnectionError:
            pass
        failures += 1
        assert time.monotonic() < deadline, "the gateway did not recover"
        time.sleep(0.5)


def test_a_postgresql_restart_loses_and_doubles_nothing(postgres, launch_network):
    template = postgres.create_databases(
        f"cn_pg_{uuid.uuid4().hex[:6]}", NETWORK_DATABASES
    )
    launched = launch_network("--no-simulate", env={"DATABASE_URL_TEMPLATE": template})
    network = launched.credentials
    portal = network["portal"]
    national = {"Authorization": f"Bearer {network['national_admin_token']}"}
    dc = network["datacenters"][GUIAN]
    agent = {"Authorization": f"Bearer {dc['agent_token']}"}
    code, _company, start = shanghai_voucher(network, GUIAN, ["pg-tenant"])

    rng = random.Random(16_003)
    records = make_records(RECORDS, "pg-tenant", rng, start, gpus=(1, 2))
    assert sum(r["gpu_seconds"] for r in records) < 256 * 3600  # nothing held
    batches = [records[i : i + BATCH] for i in range(0, RECORDS, BATCH)]

    # Restart 1: while the gateway takes records (a third of the way in).
    away: list[float] = []
    third = threading.Event()
    restarter = threading.Thread(
        target=lambda: (third.wait(120), away.append(postgres.restart()))
    )
    restarter.start()
    refused = 0
    for index, batch in enumerate(batches):
        if index == len(batches) // 3:
            third.set()
        refused += post_until_stored(dc["gateway_url"], batch, agent)
    restarter.join(120)
    # Restart 2: while metering and the city book the backlog; then records
    # already stored are sent again, as an agent that lost its answers would.
    away.append(postgres.restart())
    back_at = time.monotonic()
    resent = rng.sample(records, 300)
    for offset in range(0, len(resent), BATCH):
        refused += post_until_stored(
            dc["gateway_url"], resent[offset : offset + BATCH], agent
        )

    expected_subsidy = sum(
        cost_fen(r["gpu_seconds"], H800_PRICE_FEN)
        * SHANGHAI_RATE_BP_AT_GOVERNMENT_DC
        // 10_000
        for r in records
    )
    expected_gpu_seconds = sum(r["gpu_seconds"] for r in records)

    def voucher_settled():
        answer = requests.get(
            f"{portal}/api/v1/vouchers/{code}", headers=national, timeout=10
        )
        if answer.status_code != 200:
            return None  # the portal's own database may be coming back
        data = answer.json()
        return data if data["redeemed_fen"] >= expected_subsidy else None

    voucher = eventually_over_http(voucher_settled, 180, "every subsidy booked")
    settled_s = time.monotonic() - back_at
    assert voucher["redeemed_fen"] == expected_subsidy  # not doubled

    def summary_settled():
        answer = requests.get(f"{portal}/api/v1/network/summary", timeout=10)
        if answer.status_code != 200:
            return None
        data = answer.json()
        counted = data["gpu_seconds"] >= expected_gpu_seconds
        return data if counted and data["redeemed_fen"] >= expected_subsidy else None

    summary = eventually_over_http(summary_settled, 120, "the national summary")
    assert summary["gpu_seconds"] == expected_gpu_seconds
    assert summary["redeemed_fen"] == expected_subsidy

    def city_settled():
        data = requests.get(f"{portal}/api/v1/cities/shanghai", timeout=10).json()
        return data if data["redeemed_fen"] >= expected_subsidy else None

    city = eventually_over_http(city_settled, 90, "the registry's Shanghai")
    assert city["redeemed_fen"] == expected_subsidy

    assert launched.process.poll() is None, launched.logs()  # nobody exited
    print(
        f"\nrestarts: {len(away)}, away {', '.join(f'{s:.1f} s' for s in away)}; "
        f"gateway answers not 202: {refused}; records {RECORDS} + {len(resent)} "
        f"re-sent; every subsidy booked {settled_s:.1f} s after the last restart"
    )
