"""Federation end to end: a fourth city joins through the API and runs as its
own process with its own broker credentials; a data centre registers through
the API and streams signed usage; keys rotate and are revoked; the national
view reconciles with the cities' ledgers; removed members are refused by the
broker and their history stays.

The base network (registry, metering, three cities, portal) runs as processes
(``python -m deploy.localnet run``) on a fresh vhost and fresh PostgreSQL
databases. Expected figures are computed here, not by the product's code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import amqp.exceptions
import psycopg
import pytest
import requests
from kombu import Connection, Exchange, Producer

from services.common import creditcode
from tests.support.e2e_flow import cost_fen
from tests.support.polling import eventually_over_http
from tests.support.portal_data import datacenter
from tests.support.processes import start_service

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PRICE_FEN = 1500  # the new data centre's H800 price per GPU-hour
RATE_BP, GOV_BONUS_BP, MAX_BP = 6000, 1000, 7000  # the new city's rules
FACE_VALUE_CNY = 1_000_000
BUDGET_CNY = 50_000_000


@pytest.fixture
def network(launch_network, pg_databases, rabbit_uri, tmp_path):
    template = pg_databases("newcity")
    launched = launch_network(
        "--no-simulate",
        "--heartbeat-interval",
        "2",
        "--cities",
        "shanghai,chengdu,shandong",
        env={
            "DATABASE_URL_TEMPLATE": template,
            # metering sees a revoked key within a second
            "REGISTRY_CACHE_TTL_S": "1",
        },
    )
    extra: list[subprocess.Popen] = []
    yield {
        "creds": launched.credentials,
        "rabbit_uri": rabbit_uri,
        "registry_db": template.format(name="city_registry"),
        "city_db": template.format(name="newcity"),
        "processes": extra,
        "env": launched.env,
        "tmp": tmp_path,
    }
    for proc in extra:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        print("--- new city\n" + out.decode(errors="replace")[-3000:])


def amqp_uri_for(rabbit_uri: str, username: str, password: str) -> str:
    parts = urlsplit(rabbit_uri)
    return f"amqp://{username}:{password}@{parts.hostname}:{parts.port}{parts.path}"


def publish(uri, exchange, routing_key, body, headers=None):
    """Publish with confirms; raises when the broker refuses."""
    with Connection(uri, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(
            conn.channel(),
            exchange=Exchange(exchange, type="topic", durable=True),
            auto_declare=False,
        )
        producer.publish(
            body,
            routing_key=routing_key,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            headers=headers or {},
            user_id=conn.userid,  # validated by the broker
        )


def usage_record(dc_id, voucher, n, start):
    # Short jobs that start at ``start``, just after the holder's consent:
    # none may end more than 5 minutes ahead.
    gpus, duration = 8, 60 + 2 * n
    return {
        "record_id": f"fed-{uuid.uuid4().hex[:10]}-{n}",
        "datacenter_id": dc_id,
        "tenant_id": "fed-tenant",
        "voucher_code": voucher,
        "gpu_model": "H800",
        "gpu_count": gpus,
        "started_at": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ended_at": (start + timedelta(seconds=duration)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "gpu_seconds": gpus * duration - 11 * n,
        "source": "slurm",
        "job_id": str(n),
        "correction_of": None,
    }


def signed(uri, record, key_id, secret):
    body = json.dumps(record).encode()
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    publish(
        uri,
        "computenet.usage",
        f"{record['datacenter_id']}.usage",
        body,
        {"x-key-id": key_id, "x-signature": signature},
    )


def test_a_fourth_city_and_a_new_datacenter_join_through_the_api(network):
    creds, rabbit_uri = network["creds"], network["rabbit_uri"]
    portal = creds["portal"]
    national = {"Authorization": f"Bearer {creds['national_admin_token']}"}
    suffix = uuid.uuid4().hex[:6]
    code, dc_id = f"ningbo_{suffix}", f"e2e-west-{suffix}"
    # A voucher prefix no other city uses (2-4 capitals).
    prefix = "Z" + "".join(chr(65 + int(c, 16) % 26) for c in suffix[:3])

    # 1. The national admin admits the city: credentials, once, and the
    # voucher prefix it asked for, reserved.
    response = requests.post(
        f"{portal}/api/v1/cities",
        json={"code": code, "name": "Ningbo", "voucher_prefix": prefix},
        headers=national,
        timeout=15,
    )
    assert response.status_code == 201, response.text
    admitted = response.json()
    assert admitted["city"]["voucher_prefix"] == prefix
    city_admin = {"Authorization": f"Bearer {admitted['admin_token']}"}
    city_amqp = amqp_uri_for(rabbit_uri, **admitted["amqp"])
    again = requests.post(
        f"{portal}/api/v1/cities",
        json={"code": code, "name": "Ningbo"},
        headers=national,
        timeout=15,
    )
    assert again.status_code == 409, again.text

    # 2. Its IT writes a rules file (no voucher_prefix: the reserved one is
    # given in VOUCHER_PREFIX) and starts its own vouchers process.
    rules = network["tmp"] / f"{code}.yaml"
    rules.write_text(
        f"""city: {code}
name: Ningbo
region: east
programs:
  - id: nb-compute-2025
    kind: compute
    budget_cny: {BUDGET_CNY}
    rate_percent: {RATE_BP // 100}
    max_rate_percent: {MAX_BP // 100}
    face_value_cny: {{min: 500000, max: 2000000}}
    valid_days: 365
    review: auto
    eligibility:
      all_of:
        - registered_in: {code}
    bonuses:
      - when: {{government_run: true}}
        add_percent: {GOV_BONUS_BP // 100}
    datacenters: any
"""
    )
    city_process = start_service(
        "vouchers",
        dict(
            network["env"],
            CITY_CODE=code,
            RULES_FILE=str(rules),
            VOUCHER_PREFIX=admitted["city"]["voucher_prefix"],
            DATABASE_URL=network["city_db"],
            AMQP_URI=city_amqp,
            HEARTBEAT_INTERVAL_S="2",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    network["processes"].append(city_process)

    def city_live():
        data = requests.get(f"{portal}/api/v1/cities/{code}", timeout=10).json()
        live = data["status"] == "live" and data["programs"]
        return data if live and data["programs"][0]["rules_sha256"] else None

    city = eventually_over_http(city_live, 60, f"{code} to be live")
    budget_fen = BUDGET_CNY * 100
    assert city["budget_fen"] == budget_fen
    assert city["programs"][0]["rules_version"]

    # 3. The national admin registers a western, government-run data centre.
    response = requests.post(
        f"{portal}/api/v1/datacenters",
        json=datacenter(
            gpus=64,
            price_fen_per_gpu_hour=PRICE_FEN,
            id=dc_id,
            name="E2E West Government Centre",
            operator="E2E operator",
            city="zhongwei",
        ),
        headers=national,
        timeout=15,
    )
    assert response.status_code == 201, response.text
    registered = response.json()
    dc_amqp = amqp_uri_for(rabbit_uri, **registered["amqp"])
    key1 = {"key_id": registered["key_id"], "secret": registered["secret"]}
    dc_token = {"Authorization": f"Bearer {registered['token']}"}

    # 4. A company of the new city applies and is issued a voucher.
    response = requests.post(
        f"{portal}/api/v1/cities/{code}/applications",
        json={
            "program_id": "nb-compute-2025",
            "company": {
                "registration_id": creditcode.generate("330200"),  # Ningbo
                "name": "Ningbo Models",
                "registered_in": code,
                "employees": 30,
                "annual_revenue_cny": 1_000_000,
                "government_research_project": False,
                "founded_on": "2022-02-02",
                "sector": "foundation_models",
            },
            "requested_face_value_cny": FACE_VALUE_CNY,
        },
        headers=city_admin,
        timeout=15,
    )
    assert response.status_code == 201, response.text
    voucher = response.json()["voucher"]["code"]
    assert voucher.startswith(f"{prefix}-")
    # Its holder, with the token its first voucher brought, authorises its
    # tenant at the new data centre (DESIGN.md §9).
    holder = {"Authorization": f"Bearer {response.json()['company_token']}"}
    response = requests.put(
        f"{portal}/api/v1/vouchers/{voucher}/bindings/{dc_id}/fed-tenant",
        headers=holder,
        timeout=15,
    )
    assert response.status_code == 200, response.text
    authorised_at = datetime.strptime(
        response.json()["authorised_at"], "%Y-%m-%dT%H:%M:%SZ"
    ).replace(tzinfo=UTC)

    # 5. The data centre streams signed usage with its own AMQP user.
    start = authorised_at + timedelta(seconds=1)
    records = [usage_record(dc_id, voucher, n, start) for n in range(12)]
    for record in records:
        signed(dc_amqp, record, **key1)
    expected_gpu_seconds = sum(r["gpu_seconds"] for r in records)
    expected_subsidy = sum(
        cost_fen(r["gpu_seconds"], PRICE_FEN) * MAX_BP // 10_000 for r in records
    )
    face_fen = FACE_VALUE_CNY * 100

    def city_settled():
        data = requests.get(f"{portal}/api/v1/cities/{code}", timeout=10).json()
        return data if data["redeemed_fen"] == expected_subsidy else None

    city = eventually_over_http(city_settled, 60, "the new city's redemptions")
    assert city["committed_fen"] == face_fen - expected_subsidy
    assert city["available_fen"] == budget_fen - face_fen

    # 6. The national summary counts the fourth city with exact figures.
    def others_published():
        cities = requests.get(f"{portal}/api/v1/cities", timeout=10).json()
        others = [c for c in cities if c["code"] != code]
        live = [c for c in others if c["status"] == "live"]
        return others if len(live) == 3 and all(c["programs"] for c in live) else None

    others = eventually_over_http(others_published, 60, "the base cities' programs")

    def summary_settled():
        data = requests.get(f"{portal}/api/v1/network/summary", timeout=10).json()
        settled = data["gpu_seconds"] == expected_gpu_seconds
        return data if settled and data["live_cities"] == 4 else None

    summary = eventually_over_http(summary_settled, 60, "the summary")
    # deploy/ lists more cities than the three the launcher starts.
    assert summary["cities"] == len(others) + 1
    statuses = {c["code"]: c["status"] for c in others}
    assert summary["live_cities"] == 4, statuses
    assert summary["budget_fen"] == budget_fen + sum(c["budget_fen"] for c in others)
    assert summary["redeemed_fen"] == expected_subsidy
    assert summary["committed_fen"] == face_fen - expected_subsidy
    overview = requests.get(f"{portal}/api/v1/network/overview", timeout=10).json()
    mine = next(c for c in overview["cities"] if c["code"] == code)
    assert mine["vouchers_active"] == 1
    assert mine["redeemed_fen"] == expected_subsidy
    dc_row = next(d for d in overview["datacenters"] if d["id"] == dc_id)
    assert dc_row["gpu_seconds"] == expected_gpu_seconds

    # 7. The city's broker user is refused as another city, and for usage.
    with pytest.raises(amqp.exceptions.AccessRefused):
        publish(city_amqp, "computenet.federation", "shanghai.voucher_issued", b"{}")
    with pytest.raises(amqp.exceptions.AccessRefused):
        publish(dc_amqp, "computenet.usage", "guian-gov-01.usage", b"{}")

    # 8. Recommendations: the new centre is cheapest after the voucher.
    response = requests.get(
        f"{portal}/api/v1/datacenters/recommendations",
        params={"gpu_model": "H800", "gpus": 8, "hours": 10, "voucher": voucher},
        headers=city_admin,  # a voucher's terms: its city's (or holder's)
        timeout=15,
    )
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [i["datacenter_id"] for i in items][:1] == [dc_id]
    top = items[0]
    assert top["cost_fen"] == cost_fen(8 * 10 * 3600, PRICE_FEN)
    assert top["subsidy_fen"] == top["cost_fen"] * top["rate_bp"] // 10_000
    # The city publishes its bonuses and cap: 60 % + 10 % (government-run).
    assert top["rate_bp"] == MAX_BP == RATE_BP + GOV_BONUS_BP
    assert any("bonus" in reason for reason in top["explanation"])

    # 9. Reconciliation: zero drift, then a named discrepancy, then a rebuild.
    def reconciled():
        body = requests.post(
            f"{portal}/api/v1/network/reconciliation", headers=national, timeout=30
        ).json()
        return body if body["ok"] else None

    report = eventually_over_http(reconciled, 30, "zero drift", interval=1)
    assert report["cities"][code]["checked"] and report["drift"] == []
    with psycopg.connect(network["registry_db"], autocommit=True) as conn:
        conn.execute(
            "UPDATE programs SET redeemed_fen = redeemed_fen + 100"
            " WHERE city_code = %s",
            (code,),
        )
    report = requests.post(
        f"{portal}/api/v1/network/reconciliation", headers=national, timeout=30
    ).json()
    assert not report["ok"]
    assert {d["city"] for d in report["drift"]} == {code}
    assert any(
        d["program_id"] == "nb-compute-2025" and d["difference"] == 100
        for d in report["drift"]
    )
    command = subprocess.run(
        [sys.executable, "-m", "services.city_registry.reconcile"],
        cwd=ROOT,
        env=dict(network["env"], AMQP_URI=rabbit_uri),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert command.returncode == 1, command.stdout + command.stderr
    assert f"DRIFT {code}/nb-compute-2025 redeemed_fen" in command.stdout
    response = requests.post(
        f"{portal}/api/v1/network/reconciliation/rebuild",
        json={"city": code},
        headers=national,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert eventually_over_http(reconciled, 30, "zero drift after rebuild")

    # 10. Key rotation overlaps; a revoked key's records are bad_signature.
    response = requests.post(
        f"{portal}/api/v1/datacenters/{dc_id}/keys", headers=dc_token, timeout=15
    )
    assert response.status_code == 201, response.text
    key2 = {k: response.json()[k] for k in ("key_id", "secret")}
    overlap = usage_record(dc_id, None, 100, start)
    signed(dc_amqp, overlap, **key1)  # the old key still works

    def counted(total):
        overview = requests.get(f"{portal}/api/v1/network/overview", timeout=10)
        return overview.json()["totals"]["gpu_seconds"] == total

    after_overlap = expected_gpu_seconds + overlap["gpu_seconds"]
    eventually_over_http(lambda: counted(after_overlap), 30, "the old key's record")
    response = requests.delete(
        f"{portal}/api/v1/datacenters/{dc_id}/keys/{key1['key_id']}",
        headers=national,
        timeout=15,
    )
    assert response.status_code == 200, response.text
    time.sleep(2)  # metering's key cache (REGISTRY_CACHE_TTL_S=1)
    revoked = usage_record(dc_id, None, 101, start)
    signed(dc_amqp, revoked, **key1)
    fresh = usage_record(dc_id, None, 102, start)
    signed(dc_amqp, fresh, **key2)

    def dead_letters():
        body = requests.get(
            f"{portal}/api/v1/dead-letters",
            params={"datacenter_id": dc_id},
            headers=dc_token,
            timeout=10,
        ).json()
        return body["items"] or None

    letters = eventually_over_http(dead_letters, 30, "the revoked key's dead letter")
    assert [(x["record_id"], x["reason"]) for x in letters] == [
        (revoked["record_id"], "bad_signature")
    ]
    total = after_overlap + fresh["gpu_seconds"]
    eventually_over_http(lambda: counted(total), 30, "the new key's record")

    # 11. Removed: the broker refuses both users; the history stays.
    for path in (f"cities/{code}", f"datacenters/{dc_id}"):
        response = requests.delete(
            f"{portal}/api/v1/{path}", headers=national, timeout=15
        )
        assert response.status_code == 200, response.text
    with pytest.raises(amqp.exceptions.AccessRefused):
        publish(dc_amqp, "computenet.usage", f"{dc_id}.usage", b"{}")
    with pytest.raises(amqp.exceptions.AccessRefused):
        publish(city_amqp, "computenet.federation", f"{code}.heartbeat", b"{}")
    city = requests.get(f"{portal}/api/v1/cities/{code}", timeout=10).json()
    assert city["status"] == "removed"
    assert city["redeemed_fen"] == expected_subsidy
