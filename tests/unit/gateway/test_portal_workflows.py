"""City staff, companies and analysts day to day: review queues, voucher lists
and statements, pagination, CSV export, and the audit log of every write."""

from __future__ import annotations

import csv
import io

import pytest

from services.common.errors import Conflict
from tests.support.vouchers_data import credit_code

CITY_ADMIN = "city_admin:shanghai"
COMPANY = f"company:{credit_code(9)}"


@pytest.fixture
def shanghai(rpc, city_factory):
    rpc.replies[("city_registry", "get_city")] = lambda code: city_factory(code=code)
    rpc.replies[("city_registry", "list_cities")] = [city_factory()]
    rpc.replies[("city_registry", "voucher_prefixes")] = {"SH": "shanghai"}
    return rpc


def _application(n: int, decision: str = "pending_review") -> dict:
    return {
        "application_id": f"app-{n}",
        "program_id": "sh-compute-2025",
        "company_id": f"C{n}",
        "company": {"registration_id": f"C{n}", "name": f"Co {n}"},
        "requested_face_value_fen": 100_000_000,
        "decision": decision,
        "reasons": [{"rule": "manual_review", "passed": True, "evidence": "x"}],
        "rules_version": "2025.1",
        "voucher_code": None,
        "decided_at": "2025-03-01T08:00:00Z",
        "internal": "never shown",
    }


def test_review_queue_is_paginated_and_filtered(client, shanghai, token_for):
    shanghai.replies[("vouchers_shanghai", "list_applications")] = lambda **kw: {
        "items": [_application(n) for n in range(kw["offset"], kw["offset"] + 2)],
        "total": 7,
    }

    response = client.get(
        "/api/v1/cities/shanghai/applications?status=pending_review&limit=2&offset=4",
        headers=token_for(CITY_ADMIN),
    )

    assert response.status_code == 200
    body = response.get_json()
    assert (body["total"], body["limit"], body["offset"]) == (7, 2, 4)
    assert [a["application_id"] for a in body["items"]] == ["app-4", "app-5"]
    assert "internal" not in body["items"][0]
    assert shanghai.called("vouchers_shanghai", "list_applications") == [
        ((), {"status": "pending_review", "limit": 2, "offset": 4})
    ]


@pytest.mark.parametrize(
    "query", ["?status=maybe", "?limit=0", "?limit=1001", "?offset=-1", "?x=1"]
)
def test_bad_list_query_is_400(client, shanghai, token_for, query):
    response = client.get(
        f"/api/v1/cities/shanghai/applications{query}", headers=token_for(CITY_ADMIN)
    )

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_review_forwards_the_reviewer_and_is_audited(client, shanghai, token_for):
    shanghai.replies[("vouchers_shanghai", "review_application")] = lambda *a: (
        _application(3, "approved") | {"voucher_code": "SH-X"}
    )
    headers = token_for(CITY_ADMIN)

    response = client.post(
        "/api/v1/cities/shanghai/applications/app-3/review",
        json={"approve": True, "reason": "site visit done"},
        headers=headers,
    )

    assert response.status_code == 200
    assert response.get_json()["decision"] == "approved"
    assert shanghai.called("vouchers_shanghai", "review_application") == [
        (("app-3", True, "site visit done", CITY_ADMIN), {})
    ]
    audit = client.get("/api/v1/audit", headers=headers).get_json()
    assert audit["total"] == 1
    entry = audit["items"][0]
    assert entry["actor"] == CITY_ADMIN
    assert entry["scope"] == "shanghai"
    assert entry["action"] == "api.review_application"
    assert entry["status"] == 200
    assert entry["details"]["application_id"] == "app-3"
    assert entry["details"]["voucher_code"] == "SH-X"
    assert entry["at"].endswith("Z")
    assert len(entry["token_sha256"]) == 16


def test_review_needs_a_reason(client, shanghai, token_for):
    response = client.post(
        "/api/v1/cities/shanghai/applications/app-3/review",
        json={"approve": False},
        headers=token_for(CITY_ADMIN),
    )

    assert response.status_code == 400
    assert "reason" in response.get_json()["details"]


def test_refused_and_failed_writes_are_audited_too(
    client, shanghai, token_for, voucher_factory
):
    voucher = voucher_factory()
    shanghai.replies[("vouchers_shanghai", "revoke_voucher")] = Conflict(
        "voucher_closed", "already revoked"
    )
    client.post(
        f"/api/v1/vouchers/{voucher['code']}/revoke",
        json={"reason": "x"},
        headers=token_for(COMPANY),
    )
    client.post(
        f"/api/v1/vouchers/{voucher['code']}/revoke",
        json={"reason": "duplicate grant"},
        headers=token_for(CITY_ADMIN),
    )

    audit = client.get("/api/v1/audit", headers=token_for("national_admin"))
    entries = audit.get_json()["items"]
    assert [(e["actor"], e["status"]) for e in entries] == [
        (CITY_ADMIN, 409),
        (COMPANY, 403),
    ]
    # Reads are not audited, and a city's staff see their city's entries only.
    beijing = client.get("/api/v1/audit", headers=token_for("city_admin:beijing"))
    assert beijing.get_json()["items"] == []


def test_revoke_forwards_reason_and_actor(client, shanghai, token_for, voucher_factory):
    voucher = voucher_factory()
    shanghai.replies[("vouchers_shanghai", "revoke_voucher")] = lambda *a: (
        voucher | {"status": "revoked", "balance_fen": 0}
    )

    response = client.post(
        f"/api/v1/vouchers/{voucher['code'].lower()}/revoke",
        json={"reason": "company dissolved"},
        headers=token_for("national_admin"),
    )

    assert response.status_code == 200
    assert response.get_json()["status"] == "revoked"
    assert shanghai.called("vouchers_shanghai", "revoke_voucher") == [
        ((voucher["code"], "company dissolved", "national_admin"), {})
    ]


def test_company_lists_only_its_own_vouchers(
    client, shanghai, token_for, voucher_factory
):
    shanghai.replies[("vouchers_shanghai", "list_vouchers")] = lambda **kw: {
        "items": [voucher_factory(company_id=kw["company_id"])],
        "total": 1,
    }

    response = client.get(
        "/api/v1/cities/shanghai/vouchers?status=active",
        headers=token_for(COMPANY),
    )

    assert response.status_code == 200
    own = COMPANY.partition(":")[2]
    assert response.get_json()["items"][0]["company_id"] == own
    assert shanghai.called("vouchers_shanghai", "list_vouchers") == [
        ((), {"company_id": own, "status": "active", "limit": 100, "offset": 0})
    ]


def test_statement_pages_its_entries(client, shanghai, token_for, voucher_factory):
    voucher = voucher_factory()
    entries = [
        {
            "id": n,
            "account": f"voucher:{voucher['code']}",
            "amount_fen": -1200,
            "reference": f"usage:dc-1:r-{n}",
            "created_at": "2025-03-01T09:00:00Z",
        }
        for n in range(5)
    ]
    shanghai.replies[("vouchers_shanghai", "voucher_statement")] = (
        lambda code, limit, offset: {
            "voucher": voucher,
            "entries": entries[offset : offset + limit],
            "total": len(entries),
        }
    )
    url = f"/api/v1/vouchers/{voucher['code']}/statement"
    headers = token_for(f"company:{voucher['company_id']}")

    body = client.get(f"{url}?limit=2&offset=2", headers=headers).get_json()

    assert body["voucher"]["code"] == voucher["code"]
    assert [e["id"] for e in body["entries"]] == [2, 3]
    assert (body["total"], body["limit"], body["offset"]) == (5, 2, 2)

    exported = client.get(url, headers=headers | {"Accept": "text/csv"})
    assert exported.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    assert [row["reference"] for row in rows] == [f"usage:dc-1:r-{n}" for n in range(5)]
    assert rows[0]["amount_fen"] == "-1200"


def test_datacenter_sees_its_usage_by_tenant_and_hour(client, rpc, token_for):
    rpc.replies[("city_registry", "get_datacenter")] = lambda dc_id: {"id": dc_id}
    rpc.replies[("metering", "usage_by_tenant")] = lambda dc_id, window_hours: [
        {
            "tenant_id": "aurora-ai",
            "city": "shanghai",
            "voucher_code": None,
            "records": 3,
            "gpu_seconds": 7200,
            "cost_fen": 3000,
        }
    ]
    rpc.replies[("metering", "usage_by_hour")] = lambda dc_id, window_hours: [
        {
            "hour": "2025-03-01T08:00:00Z",
            "records": 3,
            "gpu_seconds": 7200,
            "cost_fen": 3000,
        }
    ]
    headers = token_for("datacenter:dc-1")

    tenants = client.get(
        "/api/v1/datacenters/dc-1/usage/tenants?window_hours=48", headers=headers
    )
    hourly = client.get(
        "/api/v1/datacenters/dc-1/usage/hourly?format=csv", headers=headers
    )
    other = client.get("/api/v1/datacenters/dc-2/usage/hourly", headers=headers)

    assert tenants.get_json()[0]["gpu_seconds"] == 7200
    assert rpc.called("metering", "usage_by_tenant") == [
        (("dc-1",), {"window_hours": 48})
    ]
    assert (
        hourly.get_data(as_text=True)
        .splitlines()[1]
        .startswith("2025-03-01T08:00:00Z,3,7200")
    )
    assert other.status_code == 403


def test_cities_export_as_csv(client, rpc, city_factory):
    rpc.replies[("city_registry", "list_cities")] = [
        city_factory(),
        city_factory(code="chengdu", name="Chengdu", region="west"),
    ]

    response = client.get("/api/v1/cities?format=csv")

    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert [(r["code"], r["region"]) for r in rows] == [
        ("shanghai", "east"),
        ("chengdu", "west"),
    ]
    assert rows[0]["programs"] == "[]"
    assert client.get("/api/v1/cities?format=xml").status_code == 400


def test_dead_letters_total_is_known_on_the_last_page(client, rpc, token_for):
    rpc.replies[("metering", "list_dead_letters")] = lambda **kw: [
        {"id": n, "reason": "schema"} for n in range(min(kw["limit"], 3))
    ]
    rpc.replies[("city_registry", "list_city_refusals")] = {"items": [], "total": 0}
    headers = token_for("national_admin")

    last = client.get("/api/v1/dead-letters?limit=2&offset=2", headers=headers)
    first = client.get("/api/v1/dead-letters?limit=2", headers=headers)

    assert last.get_json()["total"] == 3
    assert [d["id"] for d in last.get_json()["items"]] == [2]
    assert first.get_json()["total"] is None  # more rows exist, uncounted


def test_replay_is_for_the_national_admin_and_audited(client, rpc, token_for):
    rpc.replies[("metering", "replay_dead_letter")] = lambda dl_id: {
        "outcome": "dead_letter",
        "reason": "unknown_voucher",
    }
    headers = token_for("national_admin")

    response = client.post("/api/v1/dead-letters/12/replay", headers=headers)

    assert response.get_json() == {
        "outcome": "dead_letter",
        "reason": "unknown_voucher",
    }
    entry = client.get("/api/v1/audit", headers=headers).get_json()["items"][0]
    assert entry["details"] == {
        "dead_letter_id": 12,
        "outcome": "dead_letter",
        "reason": "unknown_voucher",
    }


def test_docs_page_renders_every_path(client):
    spec = client.get("/api/v1/openapi.json").get_json()

    page = client.get("/api/v1/docs").get_data(as_text=True)

    assert "<script" not in page  # nothing fetched from anywhere
    for path in spec["paths"]:
        assert path in page
    assert 'id="schema-Voucher"' in page


def test_every_collection_in_the_spec_is_a_page(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    for path in (
        "/api/v1/cities/{city}/applications",
        "/api/v1/cities/{city}/vouchers",
        "/api/v1/dead-letters",
        "/api/v1/audit",
    ):
        ok = spec["paths"][path]["get"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/csv"}
        page = ok["application/json"]["schema"]
        assert set(page["required"]) == {"items", "total", "limit", "offset"}
