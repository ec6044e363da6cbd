"""The federation endpoints: who may call them, and what reaches the registry."""

import pytest

from tests.support.portal_data import NATIONAL, datacenter

ADMIN = {"Authorization": f"Bearer {NATIONAL}"}
DC = datacenter(operator="op", city="x")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/v1/cities", {"code": "nb", "name": "Ningbo"}),
        ("delete", "/api/v1/cities/nb", None),
        ("post", "/api/v1/datacenters", DC),
        ("delete", "/api/v1/datacenters/dc-1", None),
        ("post", "/api/v1/network/reconciliation", None),
    ],
)
def test_only_the_national_admin(client, rpc, method, path, body):
    assert getattr(client, method)(path, json=body).status_code == 401
    rpc.roles["tok-city"] = "city_admin:nb"
    response = getattr(client, method)(
        path, json=body, headers={"Authorization": "Bearer tok-city"}
    )
    assert response.status_code == 403


def test_admitting_a_city_returns_its_credentials(client, rpc):
    rpc.replies[("city_registry", "admit_city")] = lambda code, name: {
        "city": {"code": code, "name": name},
        "admin_token": "t",
        "amqp": {"username": f"city.{code}", "password": "p"},
    }
    response = client.post(
        "/api/v1/cities", json={"code": "nb", "name": "Ningbo"}, headers=ADMIN
    )
    assert response.status_code == 201
    assert response.json["amqp"] == {"username": "city.nb", "password": "p"}


def test_a_bad_registration_never_reaches_the_registry(client, rpc):
    response = client.post(
        "/api/v1/datacenters", json=dict(DC, hub_region=None), headers=ADMIN
    )
    assert response.status_code == 400
    assert not rpc.called("city_registry", "register_datacenter")


def test_a_datacenter_rotates_its_own_key_only(client, rpc):
    rpc.roles["tok-dc"] = "datacenter:dc-1"
    rpc.replies[("city_registry", "issue_datacenter_key")] = {
        "key_id": "k2",
        "secret": "s2",
    }
    own = client.post(
        "/api/v1/datacenters/dc-1/keys", headers={"Authorization": "Bearer tok-dc"}
    )
    assert own.status_code == 201 and own.json["key_id"] == "k2"
    other = client.post(
        "/api/v1/datacenters/dc-2/keys", headers={"Authorization": "Bearer tok-dc"}
    )
    assert other.status_code == 403


def test_recommendations_are_public_and_validated(client, rpc):
    rpc.replies[("city_registry", "recommend_datacenters")] = {
        "gpu_model": "H800",
        "gpus": 2,
        "hours": 3.0,
        "voucher": None,
        "items": [],
    }
    ok = client.get("/api/v1/datacenters/recommendations?gpu_model=H800&gpus=2&hours=3")
    assert ok.status_code == 200
    assert rpc.called("city_registry", "recommend_datacenters")[0][0] == (
        "H800",
        2,
        3.0,
    )
    assert client.get("/api/v1/datacenters/recommendations").status_code == 400


def test_openapi_lists_the_federation_paths(client):
    paths = client.get("/api/v1/openapi.json").json["paths"]
    assert "post" in paths["/api/v1/cities"] and "get" in paths["/api/v1/cities"]
    assert "/api/v1/datacenters/recommendations" in paths


def _admitted(code, name, voucher_prefix="NB"):
    return {
        "city": {"code": code, "name": name, "voucher_prefix": voucher_prefix},
        "admin_token": "t",
        "amqp": {"username": f"city.{code}", "password": "p"},
    }


def test_admission_with_the_contract_fields_alone_asks_for_no_prefix(client, rpc):
    rpc.replies[("city_registry", "admit_city")] = _admitted
    response = client.post(
        "/api/v1/cities", json={"code": "nb", "name": "Ningbo"}, headers=ADMIN
    )
    assert response.status_code == 201
    assert response.json["city"]["voucher_prefix"] == "NB"
    assert rpc.called("city_registry", "admit_city") == [(("nb", "Ningbo"), {})]


def test_admission_passes_the_requested_prefix_on(client, rpc):
    rpc.replies[("city_registry", "admit_city")] = _admitted
    response = client.post(
        "/api/v1/cities",
        json={"code": "nb", "name": "Ningbo", "voucher_prefix": "NBO"},
        headers=ADMIN,
    )
    assert response.status_code == 201
    assert response.json["city"]["voucher_prefix"] == "NBO"
    assert rpc.called("city_registry", "admit_city") == [
        (("nb", "Ningbo"), {"voucher_prefix": "NBO"})
    ]


@pytest.mark.parametrize("prefix", ["nb", "N", "NINGB", "N1", 7])
def test_a_malformed_prefix_never_reaches_the_registry(client, rpc, prefix):
    response = client.post(
        "/api/v1/cities",
        json={"code": "nb", "name": "Ningbo", "voucher_prefix": prefix},
        headers=ADMIN,
    )
    assert response.status_code == 400
    assert "voucher_prefix" in response.json["details"]
    assert not rpc.called("city_registry", "admit_city")


def test_a_datacenter_with_exactly_the_contract_fields_is_registered(client, rpc):
    """CONTRACTS §7's Data centre: no city; utilisation measured, not declared."""
    rpc.replies[("city_registry", "register_datacenter")] = lambda r: {
        "datacenter": dict(r, utilisation=None),
        "key_id": "k1",
        "secret": "s",
        "amqp": {"username": "dc.dc-1", "password": "p"},
        "token": "t",
    }
    body = datacenter(operator="op", utilisation=None)
    assert "city" not in body
    response = client.post("/api/v1/datacenters", json=body, headers=ADMIN)
    assert response.status_code == 201, response.json
    ((registration,), _) = rpc.called("city_registry", "register_datacenter")[0]
    assert registration["city"] is None and "utilisation" not in registration
    assert response.json["datacenter"]["city"] is None


def test_the_openapi_documents_the_optional_fields(client):
    schemas = client.get("/api/v1/openapi.json").json["components"]["schemas"]
    admission = schemas["CityAdmission"]
    assert "voucher_prefix" in admission["properties"]
    assert set(admission["required"]) == {"code", "name"}
    assert "city" not in schemas["DatacenterRegistration"]["required"]
    assert "voucher_prefix" in schemas["City"]["properties"]
