"""The portal's /api/v1 through app.test_client(), with a fake RPC client."""

from __future__ import annotations

import json

import pytest

from gateway import app as gateway_app
from services.common import vouchercode
from services.common.errors import NotFound
from tests.support.portal_data import datacenter
from tests.support.vouchers_data import credit_code

OTHER = credit_code(99)  # a company holding nothing here

# -- public reads -----------------------------------------------------------


def test_network_summary_passes_the_registry_answer(client, rpc):
    summary = {
        "cities": 2,
        "live_cities": 1,
        "datacenters": 3,
        "budget_fen": 100,
        "committed_fen": 10,
        "redeemed_fen": 5,
        "gpu_seconds": 3600,
        "utilisation": 0.25,
        "regions": {"west": {"datacenters": 2}},
        "internal_only": "not shown",
    }
    rpc.replies[("city_registry", "network_summary")] = summary

    response = client.get("/api/v1/network/summary")

    assert response.status_code == 200
    assert response.get_json() == {
        k: v for k, v in summary.items() if k != "internal_only"
    }


def test_cities_and_one_city(client, rpc, city_factory):
    city = city_factory()
    rpc.replies[("city_registry", "list_cities")] = [city]
    rpc.replies[("city_registry", "get_city")] = lambda code: city

    assert client.get("/api/v1/cities").get_json() == [city]
    assert client.get("/api/v1/cities/shanghai").get_json() == city
    # The page came from the public view, which lists every city.
    assert rpc.called("city_registry", "get_city") == []


def test_a_city_missing_from_the_public_view_is_asked_for(client, rpc, city_factory):
    wuhan = city_factory(code="wuhan")
    rpc.replies[("city_registry", "public_view")] = {"summary": {}, "cities": []}
    rpc.replies[("city_registry", "list_cities")] = [wuhan]  # admitted since
    rpc.replies[("city_registry", "get_city")] = lambda code: wuhan

    assert client.get("/api/v1/cities/wuhan").get_json() == wuhan
    assert rpc.called("city_registry", "get_city") == [(("wuhan",), {})]


def test_unknown_city_is_404(client, rpc):
    rpc.replies[("city_registry", "get_city")] = NotFound("city_not_found", "no")

    response = client.get("/api/v1/cities/atlantis")

    assert response.status_code == 404
    assert response.get_json()["error"] == "city_not_found"


def test_datacenters_and_one_datacenter(client, rpc):
    dc = datacenter(
        gpus=64,
        id="dc-ningxia-1",
        name="Ningxia 1",
        operator="State Grid",
        city="yinchuan",
        utilisation=None,
    )
    rpc.replies[("city_registry", "list_datacenters")] = [dc]
    rpc.replies[("city_registry", "get_datacenter")] = lambda dc_id: dc

    assert client.get("/api/v1/datacenters").get_json() == [dc]
    assert client.get("/api/v1/datacenters/dc-ningxia-1").get_json() == dc


# -- applications -----------------------------------------------------------


@pytest.fixture
def city_and_apply(rpc, city_factory):
    rpc.replies[("city_registry", "get_city")] = lambda code: city_factory(code=code)
    rpc.replies[("city_registry", "list_cities")] = [city_factory()]
    rpc.replies[("vouchers_shanghai", "apply")] = lambda body: {
        "application_id": "app-1",
        "decision": "approved",
        "reasons": [{"rule": "max_employees", "passed": True, "evidence": 42}],
        "rules_version": "2025.1",
        "voucher": None,
    }


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (None, 401),
        ("national_admin", 201),
        ("city_admin:shanghai", 201),
        ("city_admin:beijing", 403),
        # a company applies in any city, only for itself
        ("company:{own}", 201),
        (f"company:{OTHER}", 403),
        ("datacenter:dc-1", 403),
    ],
)
def test_who_may_apply(
    client, rpc, token_for, application_factory, city_and_apply, role, status
):
    body = application_factory()
    own = body["company"]["registration_id"]
    headers = token_for(role.format(own=own)) if role else {}

    response = client.post(
        "/api/v1/cities/shanghai/applications", json=body, headers=headers
    )

    assert response.status_code == status, response.get_json()
    applied = rpc.called("vouchers_shanghai", "apply")
    if status == 201:
        assert response.get_json()["decision"] == "approved"
        assert applied == [((body,), {})]
    else:
        assert applied == []


def test_invalid_application_is_400_with_field_messages(
    client, rpc, token_for, application_factory, city_and_apply
):
    body = application_factory(employees=-3)
    del body["program_id"]
    body["requested_face_value_cny"] = "a lot"

    response = client.post(
        "/api/v1/cities/shanghai/applications",
        json=body,
        headers=token_for("national_admin"),
    )

    assert response.status_code == 400
    error = response.get_json()
    assert error["error"] == "invalid_request"
    assert set(error["details"]) == {
        "program_id",
        "company",
        "requested_face_value_cny",
    }
    assert "employees" in error["details"]["company"]
    assert rpc.called("vouchers_shanghai", "apply") == []


def test_application_body_must_be_json_object(client, token_for, city_and_apply):
    response = client.post(
        "/api/v1/cities/shanghai/applications",
        data="[1, 2]",
        content_type="application/json",
        headers=token_for("national_admin"),
    )

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_application_to_unknown_city_is_404_before_the_city_is_called(
    client, rpc, token_for, application_factory
):
    rpc.replies[("city_registry", "list_cities")] = []

    response = client.post(
        "/api/v1/cities/atlantis/applications",
        json=application_factory(),
        headers=token_for("national_admin"),
    )

    assert response.status_code == 404
    assert response.get_json()["error"] == "city_not_found"
    assert not [c for c in rpc.calls if c[0].startswith("vouchers_")]


def test_city_code_is_never_used_as_an_arbitrary_service_name(
    client, rpc, token_for, application_factory
):
    response = client.post(
        "/api/v1/cities/Shang Hai.x/applications",
        json=application_factory(),
        headers=token_for("national_admin"),
    )

    assert response.status_code == 404
    assert rpc.called("city_registry", "list_cities") == []


# -- vouchers ---------------------------------------------------------------


@pytest.fixture
def stored_voucher(rpc, voucher_factory):
    voucher = voucher_factory()
    rpc.replies[("city_registry", "voucher_prefixes")] = {"SH": "shanghai"}
    rpc.replies[("vouchers_shanghai", "get_voucher")] = lambda code: (
        voucher if code == voucher["code"] else NotFound("voucher_not_found", "no")
    )
    return voucher


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (None, 401),
        ("national_admin", 200),
        ("city_admin:shanghai", 200),
        ("city_admin:beijing", 403),
        ("company:{holder}", 200),
        ("datacenter:dc-1", 403),
        # Another company cannot learn the voucher exists.
        (f"company:{OTHER}", 404),
    ],
)
def test_who_may_see_a_voucher(client, token_for, stored_voucher, role, status):
    headers = (
        token_for(role.format(holder=stored_voucher["company_id"])) if role else {}
    )

    response = client.get(f"/api/v1/vouchers/{stored_voucher['code']}", headers=headers)

    assert response.status_code == status, response.get_json()
    if status == 200:
        assert response.get_json() == stored_voucher
    if status == 404:
        assert response.get_json()["error"] == "voucher_not_found"


def test_mistyped_voucher_code_is_400_without_any_rpc(client, rpc, token_for):
    code = vouchercode.generate("SH")
    wrong_check = "0" if code[-1] != "0" else "1"
    headers = token_for("national_admin")
    rpc.calls.clear()

    response = client.get(f"/api/v1/vouchers/{code[:-1]}{wrong_check}", headers=headers)

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_voucher_code"
    assert rpc.calls == []


def test_voucher_of_unknown_prefix_is_404(client, rpc, token_for):
    rpc.replies[("city_registry", "voucher_prefixes")] = {"SH": "shanghai"}

    response = client.get(
        f"/api/v1/vouchers/{vouchercode.generate('ZZ')}",
        headers=token_for("national_admin"),
    )

    assert response.status_code == 404
    assert response.get_json()["error"] == "voucher_not_found"


def test_roles_and_prefixes_are_cached(client, rpc, token_for, stored_voucher):
    headers = token_for("national_admin")
    for _ in range(3):
        client.get(f"/api/v1/vouchers/{stored_voucher['code']}", headers=headers)

    assert len(rpc.called("city_registry", "authenticate")) == 1
    assert len(rpc.called("city_registry", "voucher_prefixes")) == 1
    assert len(rpc.called("vouchers_shanghai", "get_voucher")) == 3


def test_invalid_token_is_401(client):
    response = client.get(
        "/api/v1/dead-letters", headers={"Authorization": "Bearer nobody-knows-me"}
    )

    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"


# -- dead letters -----------------------------------------------------------


@pytest.fixture
def dead_letters(rpc):
    # The cities' refusals: none here (test_portal_review.py merges them).
    rpc.replies[("city_registry", "list_city_refusals")] = lambda **kw: {
        "items": [],
        "total": 0,
    }
    rpc.replies[("metering", "list_dead_letters")] = lambda **kw: [
        {
            "id": 7,
            "datacenter_id": kw["datacenter_id"] or "dc-1",
            "record_id": "r-1",
            "routing_key": "dc-1.usage",
            "reason": kw["reason"] or "bad_signature",
            "detail": "HMAC mismatch",
            "received_at": "2025-03-01T08:00:00Z",
        }
    ]


@pytest.mark.parametrize(
    ("role", "query", "status", "forced_filter"),
    [
        (None, "", 401, None),
        ("national_admin", "", 200, {"datacenter_id": None, "reason": None}),
        ("national_admin", "?datacenter_id=dc-2&reason=schema&limit=5", 200,
         # One row more than the page, so the total is known on the last page.
         {"datacenter_id": "dc-2", "reason": "schema", "limit": 6}),
        ("datacenter:dc-1", "", 200, {"datacenter_id": "dc-1"}),
        ("datacenter:dc-1", "?datacenter_id=dc-1", 200, {"datacenter_id": "dc-1"}),
        ("datacenter:dc-1", "?datacenter_id=dc-2", 403, None),
        ("city_admin:shanghai", "", 403, None),
        (f"company:{OTHER}", "", 403, None),
        ("national_admin", "?limit=0", 400, None),
        ("national_admin", "?colour=blue", 400, None),
    ],
)  # fmt: skip
def test_who_may_list_dead_letters(
    client, rpc, token_for, dead_letters, role, query, status, forced_filter
):
    headers = token_for(role) if role else {}

    response = client.get(f"/api/v1/dead-letters{query}", headers=headers)

    assert response.status_code == status, response.get_json()
    calls = rpc.called("metering", "list_dead_letters")
    if status != 200:
        assert calls == []
        return
    assert len(calls) == 1
    kwargs = calls[0][1]
    assert kwargs.items() >= forced_filter.items()
    assert [letter["reason"] for letter in response.get_json()["items"]]
    assert response.get_json()["items"][0]["record_id"] == "r-1"


# -- health and the OpenAPI document ----------------------------------------


def test_healthz_follows_the_bus(client, monkeypatch):
    monkeypatch.setattr(gateway_app, "bus_reachable", lambda uri, **_: True)
    assert client.get("/healthz").get_json() == {"status": "ok"}

    monkeypatch.setattr(gateway_app, "bus_reachable", lambda uri, **_: False)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["error"] == "bus_unreachable"


def test_healthz_without_a_broker_is_503(client):
    # The fixture's AMQP_URI points at a closed port.
    assert client.get("/healthz").status_code == 503


def test_openapi_lists_the_paths(client):
    response = client.get("/api/v1/openapi.json")

    assert response.status_code == 200
    spec = json.loads(response.get_data(as_text=True))
    assert spec["openapi"].startswith("3.")
    assert {
        "/healthz",
        "/api/v1/network/summary",
        "/api/v1/cities",
        "/api/v1/cities/{city}",
        "/api/v1/cities/{city}/applications",
        "/api/v1/vouchers/{code}",
        "/api/v1/datacenters",
        "/api/v1/datacenters/{datacenter_id}",
        "/api/v1/dead-letters",
    } <= set(spec["paths"])
    assert {"ApplicationRequest", "Voucher", "Error"} <= set(
        spec["components"]["schemas"]
    )


def test_create_app_reads_the_config_file_without_touching_the_bus(monkeypatch):
    # Building the app must not connect: gunicorn imports it before the
    # broker may be up. The pool connects lazily, on the first call.
    monkeypatch.setenv("AMQP_URI", "amqp://guest:guest@127.0.0.1:1/")
    app = gateway_app.create_app()

    pool = app.extensions["rpc"]
    assert pool.amqp_uri == "amqp://guest:guest@127.0.0.1:1/"
    assert pool.size == 8
