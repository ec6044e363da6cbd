"""One GPU-hour the whole way: agent → gateway → bus → metering → city → registry.

The network runs as processes (``python -m deploy.localnet run``) against the
real RabbitMQ (a fresh vhost) and real PostgreSQL databases (one per process).
The test drives it only through its public contracts: the portal's HTTP API,
the data-centre gateway's HTTP API, and the AMQP usage exchange. Every expected
figure is computed here, independently of the product's code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from datetime import UTC, datetime, timedelta

import pytest
import requests
from kombu import Connection, Exchange, Producer

from services.common import creditcode
from tests.support.e2e_flow import cost_fen, make_records
from tests.support.polling import eventually_over_http

pytestmark = pytest.mark.e2e

# Facts from deploy/ that the expectations depend on, restated here on purpose.
GUIAN = "guian-gov-01"  # government-run: Shanghai adds 10 points, capped at 90 %
H800_PRICE_FEN = 1800
SHANGHAI_RATE_BP_AT_GOVERNMENT_DC = 9000


@pytest.fixture
def network(launch_network, pg_databases):
    """The whole network as processes, each on its own PostgreSQL database."""
    template = pg_databases()
    return launch_network(
        "--no-simulate", env={"DATABASE_URL_TEMPLATE": template}
    ).credentials


def test_one_gpu_hour_travels_the_whole_way(network):
    portal = network["portal"]
    national = {"Authorization": f"Bearer {network['national_admin_token']}"}
    shanghai_admin = {
        "Authorization": f"Bearer {network['cities']['shanghai']['admin_token']}"
    }
    dc = network["datacenters"][GUIAN]
    agent = {"Authorization": f"Bearer {dc['agent_token']}"}
    gateway = dc["gateway_url"]

    # 1. A Shanghai company applies and receives a voucher.
    application = {
        "program_id": "sh-compute-2025",
        "company": {
            "registration_id": creditcode.generate(),
            "name": "E2E Test Models Ltd",
            "registered_in": "shanghai",
            "employees": 42,
            "annual_revenue_cny": 9_000_000,
            "government_research_project": False,
            "founded_on": "2020-01-01",
            "sector": "foundation_models",
        },
        "requested_face_value_cny": 1_000_000,
    }
    response = requests.post(
        f"{portal}/api/v1/cities/shanghai/applications",
        json=application,
        headers=shanghai_admin,
        timeout=15,
    )
    assert response.status_code == 201, response.text
    decision = response.json()
    assert decision["decision"] == "approved", decision
    voucher = decision["voucher"]
    code = voucher["code"]
    face_value_fen = 1_000_000 * 100
    assert voucher["face_value_fen"] == face_value_fen

    # 1b. Its first voucher brought the company its portal token (once), with
    #     which it reads its voucher; a re-issue by the city replaces it.
    company_id = application["company"]["registration_id"]
    company = {"Authorization": f"Bearer {decision['company_token']}"}
    own = requests.get(f"{portal}/api/v1/vouchers/{code}", headers=company, timeout=10)
    assert own.status_code == 200, own.text
    assert own.json()["company_id"] == company_id
    response = requests.post(
        f"{portal}/api/v1/companies/{company_id}/token",
        headers=shanghai_admin,
        timeout=10,
    )
    assert response.status_code == 201, response.text
    assert response.json()["revoked_tokens"] == 1
    stale = requests.get(
        f"{portal}/api/v1/vouchers/{code}", headers=company, timeout=10
    )
    assert stale.status_code == 401
    company = {"Authorization": f"Bearer {response.json()['token']}"}
    own = requests.get(f"{portal}/api/v1/vouchers/{code}", headers=company, timeout=10)
    assert own.status_code == 200, own.text

    # 2. The data centre asks for the voucher for its tenant; the company, its
    #    holder, authorises that tenant and another one on the portal
    #    (tests/security/test_bindings.py: nobody else can).
    response = requests.put(
        f"{gateway}/v1/tenants/e2e-tenant/voucher",
        json={"voucher_code": code},
        headers=agent,
        timeout=10,
    )
    assert response.status_code in (200, 202, 204), response.text
    consent = f"{portal}/api/v1/vouchers/{code}/bindings/{GUIAN}"
    authorised_at = []
    for tenant in ("e2e-tenant", "e2e-other"):
        response = requests.put(f"{consent}/{tenant}", headers=company, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "authorised"
        authorised_at.append(response.json()["authorised_at"])
    listed = requests.get(
        f"{portal}/api/v1/vouchers/{code}/bindings", headers=company, timeout=10
    ).json()
    assert {(b["tenant_id"], b["status"]) for b in listed["items"]} >= {
        ("e2e-tenant", "authorised"),
        ("e2e-other", "authorised"),
    }

    # 3. 1 000 usage records after the authorisation: 600 carry the voucher
    #    through the tenant mapping, 200 name it explicitly, 200 belong to a
    #    tenant with no voucher; 100 of them are posted twice. And 20 the
    #    voucher must not pay for: 10 of a tenant its holder never authorised
    #    (naming the code it has seen), 10 that started before the
    #    authorisation.
    rng = random.Random(20261122)
    start = datetime.strptime(max(authorised_at), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC
    ) + timedelta(seconds=1)
    with_voucher = make_records(600, "e2e-tenant", rng, start)
    explicit = make_records(200, "e2e-other", rng, start, voucher_code=code)
    metered_only = make_records(200, "e2e-no-voucher", rng, start)
    stranger = make_records(10, "e2e-stranger", rng, start, voucher_code=code)
    too_early = make_records(10, "e2e-tenant", rng, start - timedelta(hours=1))
    records = with_voucher + explicit + metered_only + stranger + too_early
    assert len(records) == 1020
    for offset in range(0, len(records), 250):
        response = requests.post(
            f"{gateway}/v1/usage",
            json=records[offset : offset + 250],
            headers=agent,
            timeout=30,
        )
        assert response.status_code == 202, response.text
    duplicates = rng.sample(records, 100)
    response = requests.post(
        f"{gateway}/v1/usage", json=duplicates, headers=agent, timeout=30
    )
    assert response.status_code == 202, response.text

    # 4. Bad input straight onto the bus: a forged signature and a body that
    #    is not JSON. Neither may be applied, nor stop the stream.
    forged = make_records(1, "e2e-tenant", rng, start, voucher_code=code)[0]
    forged["datacenter_id"] = GUIAN
    forged_body = json.dumps(forged).encode()
    exchange = Exchange("computenet.usage", type="topic", durable=True)
    with Connection(network["amqp_uri"]) as conn:
        producer = Producer(conn.channel(), exchange=exchange)
        for body, signature in [
            (
                forged_body,
                hmac.new(b"not-the-secret", forged_body, hashlib.sha256).hexdigest(),
            ),
            (
                b"{not json",
                hmac.new(
                    dc["secret"].encode(), b"{not json", hashlib.sha256
                ).hexdigest(),
            ),
        ]:
            producer.publish(
                body,
                routing_key=f"{GUIAN}.usage",
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                headers={"x-key-id": dc["key_id"], "x-signature": signature},
                user_id=conn.userid,
            )

    # 5. More good records after the bad ones: the stream goes on.
    tail = make_records(20, "e2e-tenant", rng, start)
    response = requests.post(
        f"{gateway}/v1/usage", json=tail, headers=agent, timeout=30
    )
    assert response.status_code == 202, response.text
    records += tail
    subsidised = with_voucher + explicit + tail

    # Expected figures, computed here.
    costs = {
        r["record_id"]: cost_fen(r["gpu_seconds"], H800_PRICE_FEN) for r in records
    }
    expected_subsidy = sum(
        costs[r["record_id"]] * SHANGHAI_RATE_BP_AT_GOVERNMENT_DC // 10_000
        for r in subsidised
    )
    assert 0 < expected_subsidy < face_value_fen  # no record is capped by the balance
    expected_gpu_seconds = sum(r["gpu_seconds"] for r in records)
    assert expected_gpu_seconds < 256 * 3600  # within capacity: nothing held

    def voucher_settled():
        body = requests.get(
            f"{portal}/api/v1/vouchers/{code}", headers=national, timeout=10
        )
        body.raise_for_status()
        data = body.json()
        return data if data["redeemed_fen"] == expected_subsidy else None

    final = eventually_over_http(voucher_settled, 120, "every subsidy to be booked")
    assert final["balance_fen"] == face_value_fen - expected_subsidy
    assert final["released_fen"] == 0

    def city_settled():
        data = requests.get(f"{portal}/api/v1/cities/shanghai", timeout=10).json()
        return data if data["redeemed_fen"] == expected_subsidy else None

    city = eventually_over_http(
        city_settled, 90, "the registry to see Shanghai's redemptions"
    )
    program = next(p for p in city["programs"] if p["id"] == "sh-compute-2025")
    assert program["redeemed_fen"] == expected_subsidy
    assert (
        program["available_fen"] + program["committed_fen"] + program["redeemed_fen"]
        == (program["budget_fen"])
    )

    def summary_settled():
        data = requests.get(f"{portal}/api/v1/network/summary", timeout=10).json()
        return data if data["gpu_seconds"] == expected_gpu_seconds else None

    summary = eventually_over_http(
        summary_settled, 90, "the national summary to count every GPU-second"
    )
    assert summary["redeemed_fen"] == expected_subsidy
    assert summary["live_cities"] == 3  # the three cities make run starts
    assert summary["datacenters"] == 2

    # The bad messages are dead letters with their reasons; nothing else is.
    # The city's refusals reach the registry's copy on their own time.
    def all_letters():
        answer = requests.get(
            f"{portal}/api/v1/dead-letters",
            params={"datacenter_id": GUIAN},
            headers=national,
            timeout=10,
        )
        answer.raise_for_status()
        return answer if len(answer.json()["items"]) >= 22 else None

    letters = eventually_over_http(all_letters, 60, "the city's refusals")
    reasons = sorted(letter["reason"] for letter in letters.json()["items"])
    assert reasons == sorted(
        ["bad_signature", "schema"]
        + ["tenant_not_authorised"] * 10
        + ["before_authorisation"] * 10
    ), reasons
    refused_by_city = {
        letter["record_id"]
        for letter in letters.json()["items"]
        if letter["source"] == "shanghai"
    }
    assert refused_by_city == {r["record_id"] for r in stranger + too_early}
