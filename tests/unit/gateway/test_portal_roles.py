"""Role × endpoint: every forbidden access is 403 (404 where existence itself
is private), every allowed one succeeds, and a refused call reaches no city,
metering or voucher service."""

from __future__ import annotations

import pytest

from services.common import vouchercode
from tests.support.vouchers_data import credit_code

HOLDER = credit_code(7)
OTHER = credit_code(8)
CODE = vouchercode.generate("SH")

ROLES = {
    "anonymous": None,
    "national": "national_admin",
    "sh_admin": "city_admin:shanghai",
    "bj_admin": "city_admin:beijing",
    # a company is one identity in every city: no city in its role
    "holder": f"company:{HOLDER}",
    "other_co": f"company:{OTHER}",
    "dc1": "datacenter:dc-1",
}

APPLICATION = {
    "program_id": "sh-compute-2025",
    "company": {
        "registration_id": HOLDER,
        "name": "Holder AI",
        "registered_in": "shanghai",
    },
    "requested_face_value_cny": 1_000_000,
}

# (method, path, json body) per endpoint; the expected status per role, in
# the order of ROLES.
ENDPOINTS = {
    "summary": ("GET", "/api/v1/network/summary", None),
    "cities": ("GET", "/api/v1/cities", None),
    "city": ("GET", "/api/v1/cities/shanghai", None),
    "datacenters": ("GET", "/api/v1/datacenters", None),
    "datacenter": ("GET", "/api/v1/datacenters/dc-1", None),
    "apply": ("POST", "/api/v1/cities/shanghai/applications", APPLICATION),
    "applications": ("GET", "/api/v1/cities/shanghai/applications", None),
    "review": (
        "POST",
        "/api/v1/cities/shanghai/applications/app-1/review",
        {"approve": True, "reason": "documents checked"},
    ),
    "vouchers": ("GET", "/api/v1/cities/shanghai/vouchers", None),
    "own_vouchers": (
        "GET",
        f"/api/v1/cities/shanghai/vouchers?company_id={HOLDER}",
        None,
    ),
    "voucher": ("GET", f"/api/v1/vouchers/{CODE}", None),
    "statement": ("GET", f"/api/v1/vouchers/{CODE}/statement", None),
    "revoke": ("POST", f"/api/v1/vouchers/{CODE}/revoke", {"reason": "fraud"}),
    "dc_tenants": ("GET", "/api/v1/datacenters/dc-1/usage/tenants", None),
    "dc_hourly": ("GET", "/api/v1/datacenters/dc-1/usage/hourly", None),
    "dead_letters": ("GET", "/api/v1/dead-letters", None),
    "own_dead_letters": ("GET", "/api/v1/dead-letters?datacenter_id=dc-1", None),
    "other_dead_letters": ("GET", "/api/v1/dead-letters?datacenter_id=dc-2", None),
    "replay": ("POST", "/api/v1/dead-letters/7/replay", None),
    "audit": ("GET", "/api/v1/audit", None),
    "openapi": ("GET", "/api/v1/openapi.json", None),
    "docs": ("GET", "/api/v1/docs", None),
}

#                anon national sh_adm bj_adm holder other  dc1
EXPECTED = {
    "summary":            (200, 200, 200, 200, 200, 200, 200),
    "cities":             (200, 200, 200, 200, 200, 200, 200),
    "city":               (200, 200, 200, 200, 200, 200, 200),
    "datacenters":        (200, 200, 200, 200, 200, 200, 200),
    "datacenter":         (200, 200, 200, 200, 200, 200, 200),
    "apply":              (401, 201, 201, 403, 201, 403, 403),
    "applications":       (401, 200, 200, 403, 403, 403, 403),
    "review":             (401, 200, 200, 403, 403, 403, 403),
    "vouchers":           (401, 200, 200, 403, 200, 200, 403),
    "own_vouchers":       (401, 200, 200, 403, 200, 403, 403),
    "voucher":            (401, 200, 200, 403, 200, 404, 403),
    "statement":          (401, 200, 200, 403, 200, 404, 403),
    "revoke":             (401, 200, 200, 403, 403, 403, 403),
    "dc_tenants":         (401, 200, 403, 403, 403, 403, 200),
    "dc_hourly":          (401, 200, 403, 403, 403, 403, 200),
    "dead_letters":       (401, 200, 403, 403, 403, 403, 200),
    "own_dead_letters":   (401, 200, 403, 403, 403, 403, 200),
    "other_dead_letters": (401, 200, 403, 403, 403, 403, 403),
    "replay":             (401, 200, 403, 403, 403, 403, 403),
    "audit":              (401, 200, 200, 200, 403, 403, 403),
    "openapi":            (200, 200, 200, 200, 200, 200, 200),
    "docs":               (200, 200, 200, 200, 200, 200, 200),
}  # fmt: skip

CASES = [
    pytest.param(endpoint, role, status, id=f"{endpoint}-{role}")
    for endpoint, statuses in EXPECTED.items()
    for role, status in zip(ROLES, statuses, strict=True)
]


@pytest.fixture
def network(rpc, city_factory, voucher_factory):
    voucher = voucher_factory(code=CODE, company_id=HOLDER)
    dc = {"id": "dc-1", "name": "DC 1", "inventory": [], "utilisation": None}
    application = {"application_id": "app-1", "decision": "approved"}
    replies = {
        ("city_registry", "network_summary"): {"cities": 1},
        ("city_registry", "list_cities"): [city_factory()],
        ("city_registry", "get_city"): lambda code: city_factory(code=code),
        ("city_registry", "list_datacenters"): [dc],
        ("city_registry", "get_datacenter"): lambda dc_id: dc,
        ("city_registry", "voucher_prefixes"): {"SH": "shanghai", "BJ": "beijing"},
        ("vouchers_shanghai", "apply"): lambda body: {
            "application_id": "app-1",
            "decision": "approved",
            "reasons": [],
            "rules_version": "1",
            "voucher": None,
        },
        ("vouchers_shanghai", "list_applications"): lambda **kw: {
            "items": [application],
            "total": 1,
        },
        ("vouchers_shanghai", "review_application"): lambda *a: application,
        ("vouchers_shanghai", "list_vouchers"): lambda **kw: {
            "items": [voucher],
            "total": 1,
        },
        ("vouchers_shanghai", "get_voucher"): lambda code: voucher,
        ("vouchers_shanghai", "voucher_statement"): lambda code, **kw: {
            "voucher": voucher,
            "entries": [],
            "total": 0,
        },
        ("vouchers_shanghai", "revoke_voucher"): lambda *a: (
            voucher | {"status": "revoked"}
        ),
        ("metering", "list_dead_letters"): lambda **kw: [],
        ("city_registry", "list_city_refusals"): lambda **kw: {"items": [], "total": 0},
        ("metering", "usage_by_tenant"): lambda dc_id, **kw: [],
        ("metering", "usage_by_hour"): lambda dc_id, **kw: [],
        ("metering", "replay_dead_letter"): lambda dl_id: {
            "outcome": "applied",
            "reason": None,
        },
    }
    rpc.replies.update(replies)
    return rpc


@pytest.mark.parametrize(("endpoint", "role", "status"), CASES)
def test_role_may_or_may_not_reach_endpoint(
    client, network, token_for, endpoint, role, status
):
    method, path, body = ENDPOINTS[endpoint]
    headers = token_for(ROLES[role]) if ROLES[role] else {}

    response = client.open(path, method=method, json=body, headers=headers)

    assert response.status_code == status, response.get_data(as_text=True)[:300]
    if status >= 400:
        assert set(response.get_json()) == {"error", "message", "details"}
    if status in (401, 403):
        # Refused before any effect: no voucher service or metering was asked.
        # (GET /vouchers/<code> may ask the registry which city issued it.)
        assert not [
            call
            for call in network.calls
            if call[0].startswith("vouchers_") or call[0] == "metering"
        ]
