"""The dashboard's pages render from the RPC answers, and private parts need
a signed-in role."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.portal_data import datacenter
from tests.support.vouchers_data import credit_code

HOLDER, OTHER = credit_code(1), credit_code(2)


@pytest.fixture
def network(rpc, city_factory, voucher_factory):
    voucher = voucher_factory(company_id=HOLDER)
    city = city_factory(
        programs=[
            {
                "id": "sh-compute-2025",
                "kind": "compute",
                "rate_bp": 8000,
                "budget_fen": 100,
                "available_fen": 60,
                "committed_fen": 30,
                "redeemed_fen": 10,
                "released_fen": 0,
                "rules_version": "2025.1",
            }
        ]
    )
    dc = datacenter(name="Gui'an 1", utilisation=0.25)
    rpc.replies.update(
        {
            ("city_registry", "network_summary"): {
                "cities": 1,
                "live_cities": 1,
                "datacenters": 1,
                "budget_fen": 100,
                "committed_fen": 30,
                "redeemed_fen": 10,
                "gpu_seconds": 7200,
                "utilisation": 0.25,
                "regions": {"west": {"utilisation": 0.25}, "east": {}},
            },
            ("city_registry", "list_cities"): [city],
            ("city_registry", "get_city"): lambda code: city,
            ("city_registry", "list_datacenters"): [dc],
            ("city_registry", "get_datacenter"): lambda dc_id: dc,
            ("city_registry", "voucher_prefixes"): {"SH": "shanghai"},
            ("metering", "usage_by_hour"): lambda dc_id, window_hours: [
                {"hour": "2025-03-01T08:00:00Z", "gpu_seconds": 7200}
            ],
            ("metering", "usage_by_tenant"): lambda dc_id, window_hours: [],
            ("metering", "list_dead_letters"): lambda **kw: [],
            ("vouchers_shanghai", "get_voucher"): lambda code: voucher,
            ("vouchers_shanghai", "list_applications"): lambda **kw: {
                "items": [],
                "total": 0,
            },
            ("vouchers_shanghai", "list_vouchers"): lambda **kw: {
                "items": [voucher],
                "total": 1,
            },
        }
    )
    return {"voucher": voucher}


def _chart_data(html: str) -> dict:
    found = re.search(r'id="chart-data">(.*?)</script>', html, re.S)
    return json.loads(found.group(1))


def _sign_in(client, token_for, role: str) -> None:
    token = token_for(role)["Authorization"].split()[1]
    response = client.post("/login", data={"token": token})
    assert response.status_code == 302


def test_national_page_has_totals_charts_and_refreshes(client, rpc, network):
    html = client.get("/").get_data(as_text=True)

    assert 'http-equiv="refresh"' in html
    assert "CNY 1.00" in html and "2.0" in html  # budget, GPU-hours
    data = _chart_data(html)
    assert data["budgets"]["committed"] == [2_000_000.0]
    assert data["regions"]["labels"] == ["west", "east"]
    assert data["hourly"]["values"] == [2.0]
    # One question for the whole network, not one per data centre.
    assert rpc.called("metering", "usage_by_hour") == [((None,), {"window_hours": 24})]
    assert "vendor/chart-4.6.1.umd.min.js" in html
    assert "cdn" not in html.lower()


def test_city_page_shows_vouchers_to_its_staff_only(client, network, token_for):
    public = client.get("/cities/shanghai").get_data(as_text=True)
    assert "sh-compute-2025" in public and 'id="vouchers"' not in public

    _sign_in(client, token_for, "city_admin:shanghai")
    staff = client.get("/cities/shanghai").get_data(as_text=True)
    assert network["voucher"]["code"] in staff


def test_voucher_page_needs_its_holder(client, network, token_for):
    url = f"/vouchers/{network['voucher']['code']}"
    assert client.get(url).status_code == 302  # to the sign-in page

    _sign_in(client, token_for, f"company:{OTHER}")
    assert client.get(url).status_code == 404

    _sign_in(client, token_for, f"company:{HOLDER}")
    page = client.get(url)
    assert page.status_code == 200
    assert _chart_data(page.get_data(as_text=True))["balance"]["values"][0] == 1e6


def test_datacenter_page_and_bad_sign_in(client, network):
    html = client.get("/datacenters/dc-1").get_data(as_text=True)
    assert "H800" in html and "CNY 15.00" in html
    assert client.post("/login", data={"token": "nope"}).status_code == 401


def test_sign_in_never_redirects_off_site(client, network, token_for):
    token = token_for("national_admin")["Authorization"].split()[1]
    response = client.post("/login", data={"token": token, "next": "//evil.example"})
    assert response.headers["Location"] == "/"
