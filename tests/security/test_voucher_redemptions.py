"""A voucher's redemption lines say where and how much its company computed:
``GET /api/v1/vouchers/<code>/redemptions`` is for its holder, its city's
staff and the national admin only (DESIGN.md §8). Each refusal beside the
callers who must still get their pages.
"""

from __future__ import annotations

import pytest

from tests.security.conftest import HOLDER, OTHER_COMPANY

LINE = {
    "record_id": "rec-1",
    "datacenter_id": "dc-1",
    "gpu_seconds": 3600,
    "cost_fen": 10_000,
    "subsidy_fen": 8_000,
    "status": "booked",
}


@pytest.fixture
def lines(rpc, network):
    rpc.replies[("vouchers_shanghai", "list_redemptions")] = lambda code, **kw: {
        "voucher": network["voucher"],
        "items": [LINE],
        "total": 1,
    }
    return network


def _url(code: str) -> str:
    return f"/api/v1/vouchers/{code}/redemptions"


def _city_asked(rpc) -> list:
    return rpc.called("vouchers_shanghai", "list_redemptions")


@pytest.mark.parametrize(
    "role", ["national_admin", "city_admin:shanghai", f"company:{HOLDER}"]
)
def test_the_holder_its_city_and_national_get_pages(client, lines, token_for, role):
    response = client.get(_url(lines["code"]), headers=token_for(role))

    assert response.status_code == 200
    body = response.get_json()
    assert (body["total"], body["limit"], body["offset"]) == (1, 100, 0)
    assert body["items"][0]["record_id"] == "rec-1"


def test_anonymous_is_refused_before_the_city_is_asked(client, rpc, lines):
    response = client.get(_url(lines["code"]))

    assert response.status_code == 401
    assert _city_asked(rpc) == []


@pytest.mark.parametrize(
    "role",
    [
        "city_admin:beijing",
        "datacenter:dc-1",
    ],
)
def test_another_city_or_a_data_centre_is_refused_by_the_prefix(
    client, rpc, lines, token_for, role
):
    response = client.get(_url(lines["code"]), headers=token_for(role))

    assert response.status_code == 403
    assert _city_asked(rpc) == []


def test_another_company_learns_not_even_that_it_exists(client, lines, token_for):
    response = client.get(
        _url(lines["code"]), headers=token_for(f"company:{OTHER_COMPANY}")
    )

    assert response.status_code == 404
    assert response.get_json()["error"] == "voucher_not_found"
    assert "rec-1" not in response.get_data(as_text=True)


def test_another_company_gets_no_csv_either(client, lines, token_for):
    response = client.get(
        _url(lines["code"]) + "?format=csv",
        headers=token_for(f"company:{OTHER_COMPANY}"),
    )

    assert response.status_code == 404
    assert "rec-1" not in response.get_data(as_text=True)
