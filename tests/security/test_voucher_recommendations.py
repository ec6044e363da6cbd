"""Recommendations priced with a voucher: its balance and program are private.

``GET /api/v1/datacenters/recommendations`` is public, but with ``voucher=``
it reveals what the voucher is worth: only its company, its city's staff and
the national admin may name it (DESIGN.md §8: anyone may "learn nothing about
a voucher"). Each refusal beside the callers who must still get an answer.
"""

from __future__ import annotations

import pytest

from services.common import vouchercode
from tests.security.conftest import HOLDER, OTHER_COMPANY

URL = "/api/v1/datacenters/recommendations?gpu_model=H800&gpus=8&hours=10"


def _ask(client, code, headers=None):
    return client.get(f"{URL}&voucher={code}", headers=headers or {})


def _registry_asked(rpc) -> list:
    return rpc.called("city_registry", "recommend_datacenters")


def test_without_a_voucher_anyone_gets_recommendations(client, rpc, network):
    response = client.get(URL)

    assert response.status_code == 200
    assert _registry_asked(rpc) == [
        (("H800", 8, 10.0), {"voucher": None, "company_id": None})
    ]


def test_anonymous_may_not_name_a_voucher(client, rpc, network):
    response = _ask(client, network["code"])

    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"
    assert _registry_asked(rpc) == []


def test_a_made_up_token_may_not_name_a_voucher(client, rpc, network):
    response = _ask(client, network["code"], {"Authorization": "Bearer made-up"})

    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"


@pytest.mark.parametrize(
    "role",
    ["city_admin:beijing", "datacenter:dc-1"],
)
def test_another_city_or_a_data_centre_is_forbidden(
    client, rpc, network, token_for, role
):
    response = _ask(client, network["code"], token_for(role))

    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"
    assert _registry_asked(rpc) == []


def test_another_company_is_refused_by_the_registry(client, rpc, network, token_for):
    """The portal does not read the voucher itself: it names the caller's
    company, and the registry answers voucher_not_found for another's."""
    from services.common.errors import NotFound

    rpc.replies[("city_registry", "recommend_datacenters")] = NotFound(
        "voucher_not_found", "no voucher"
    )

    response = _ask(client, network["code"], token_for(f"company:{OTHER_COMPANY}"))

    assert response.status_code == 404
    assert response.get_json()["error"] == "voucher_not_found"
    ((_, kwargs),) = _registry_asked(rpc)
    assert kwargs["company_id"] == OTHER_COMPANY


@pytest.mark.parametrize(
    ("role", "company_id"),
    [
        (f"company:{HOLDER}", HOLDER),
        ("city_admin:shanghai", None),
        ("national_admin", None),
    ],
)
def test_its_company_city_and_the_nation_get_net_prices(
    client, rpc, network, token_for, role, company_id
):
    response = _ask(client, network["code"].lower(), token_for(role))

    assert response.status_code == 200
    assert response.get_json()["voucher"] == network["code"]
    ((_, kwargs),) = _registry_asked(rpc)
    assert kwargs == {"voucher": network["code"], "company_id": company_id}


def test_a_mistyped_voucher_is_400_before_any_lookup(client, rpc, network):
    code = network["code"]
    mistyped = code[:-1] + ("A" if code[-1] != "A" else "B")

    response = _ask(client, mistyped)

    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_voucher_code"
    assert [c for c in rpc.calls if c[1] != "authenticate"] == []


def test_a_prefix_no_city_issues_is_404_without_asking_a_city(
    client, rpc, network, token_for
):
    response = _ask(client, vouchercode.generate("ZZ"), token_for("national_admin"))

    assert response.status_code == 404
    assert response.get_json()["error"] == "voucher_not_found"
    assert _registry_asked(rpc) == []
