"""What several e2e tests do the same way on a running network: usage
records of honest jobs, the expected cost of one, and a Shanghai voucher
whose holder authorised a tenant at a data centre (CONTRACTS.md §6, §7).

Every figure is computed here, independently of the product's code."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import requests

from services.common import creditcode


def cost_fen(gpu_seconds: int, price: int) -> int:
    """GPU-seconds × price per GPU-hour, in fen, rounded half up."""
    whole, remainder = divmod(gpu_seconds * price, 3600)
    return whole + (1 if remainder * 2 >= 3600 else 0)


def make_records(n, tenant, rng, start, voucher_code=None, gpus=(1, 2, 4, 8)):
    """Jobs that start within 30 s of ``start`` and run 1 to 4 minutes: the
    voucher pays only for jobs that started after its holder authorised the
    tenant, and a record may end at most 5 minutes ahead. An honest data
    centre: with the default ``gpus``, a thousand of them stay within Gui'an's
    256 H800s (256 × 3 600 GPU-seconds an hour), else metering holds the
    excess ``over_capacity`` (docs/metering_holds.md) and no city pays it."""
    records = []
    for i in range(n):
        count = rng.choice(gpus)
        duration = rng.randint(60, 240)
        began = start + timedelta(seconds=rng.randint(0, 30))
        records.append(
            {
                "record_id": f"{tenant}-{uuid.uuid4().hex[:12]}-{i}",
                "tenant_id": tenant,
                "voucher_code": voucher_code,
                "gpu_model": "H800",
                "gpu_count": count,
                "started_at": began.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "ended_at": (began + timedelta(seconds=duration)).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                ),
                "gpu_seconds": count * duration * rng.randint(50, 100) // 100,
                "source": "slurm",
                "job_id": str(rng.randint(10_000, 99_999)),
                "correction_of": None,
            }
        )
    return records


def shanghai_voucher(network, datacenter_id, tenants, face_value_cny=1_000_000):
    """A Shanghai company's approved voucher whose holder authorised
    ``tenants`` at ``datacenter_id`` on the portal, after the data centre
    asked for the first one. Returns ``(code, company headers, start)``:
    ``start`` is the first whole second after the last authorisation."""
    portal = network["portal"]
    city_admin = {
        "Authorization": f"Bearer {network['cities']['shanghai']['admin_token']}"
    }
    dc = network["datacenters"][datacenter_id]
    response = requests.post(
        f"{portal}/api/v1/cities/shanghai/applications",
        json={
            "program_id": "sh-compute-2025",
            "company": {
                "registration_id": creditcode.generate(),
                "name": "E2E Flow Models Ltd",
                "registered_in": "shanghai",
                "employees": 42,
                "annual_revenue_cny": 9_000_000,
                "government_research_project": False,
                "founded_on": "2020-01-01",
                "sector": "foundation_models",
            },
            "requested_face_value_cny": face_value_cny,
        },
        headers=city_admin,
        timeout=15,
    )
    assert response.status_code == 201, response.text
    decision = response.json()
    assert decision["decision"] == "approved", decision
    code = decision["voucher"]["code"]
    company = {"Authorization": f"Bearer {decision['company_token']}"}
    response = requests.put(
        f"{dc['gateway_url']}/v1/tenants/{tenants[0]}/voucher",
        json={"voucher_code": code},
        headers={"Authorization": f"Bearer {dc['agent_token']}"},
        timeout=10,
    )
    assert response.status_code in (200, 202, 204), response.text
    authorised_at = []
    for tenant in tenants:
        response = requests.put(
            f"{portal}/api/v1/vouchers/{code}/bindings/{datacenter_id}/{tenant}",
            headers=company,
            timeout=10,
        )
        assert response.status_code == 200, response.text
        authorised_at.append(response.json()["authorised_at"])
    start = datetime.strptime(max(authorised_at), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC
    ) + timedelta(seconds=1)
    return code, company, start
