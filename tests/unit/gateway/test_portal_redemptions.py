"""``GET /api/v1/vouchers/<code>/redemptions`` over the fake RPC: the page
shape of every collection, its limits, CSV, and the voucher view's
``redemptions_total``."""

from __future__ import annotations

import pytest

from services.common import vouchercode
from tests.support.portal_data import NATIONAL

CODE = vouchercode.generate("SH")
AUTH = {"Authorization": f"Bearer {NATIONAL}"}
VOUCHER = {"code": CODE, "city": "shanghai", "company_id": "C1"}


def _line(n: int) -> dict:
    return {
        "record_id": f"rec-{n}",
        "datacenter_id": "dc-1",
        "tenant_id": None,
        "started_at": None,
        "ended_at": None,
        "gpu_seconds": 3600,
        "cost_fen": 10_000,
        "subsidy_fen": 8_000,
        "status": "booked",
        "kind": "usage",  # the city's extension: not shown by the portal
        "booked_at": "2026-01-01T00:00:00Z",
        "reason": None,
    }


LINES = [_line(n) for n in range(7)]


@pytest.fixture
def city(rpc):
    rpc.replies.update(
        {
            ("city_registry", "voucher_prefixes"): {"SH": "shanghai"},
            ("city_registry", "list_cities"): [
                {"code": "shanghai", "status": "live", "voucher_prefix": "SH"}
            ],
            ("vouchers_shanghai", "list_redemptions"): lambda code, limit, offset: {
                "voucher": VOUCHER,
                "items": LINES[offset : offset + limit],
                "total": len(LINES),
            },
            ("vouchers_shanghai", "get_voucher"): lambda code: (
                VOUCHER | {"redemptions": LINES[-3:], "redemptions_total": len(LINES)}
            ),
        }
    )
    return rpc


def _get(client, query: str = ""):
    return client.get(f"/api/v1/vouchers/{CODE}/redemptions{query}", headers=AUTH)


def test_a_page_has_the_collection_shape_and_the_contract_fields(client, city):
    body = _get(client, "?limit=3&offset=2").get_json()

    assert (body["total"], body["limit"], body["offset"]) == (7, 3, 2)
    assert [i["record_id"] for i in body["items"]] == ["rec-2", "rec-3", "rec-4"]
    assert "kind" not in body["items"][0]
    assert city.called("vouchers_shanghai", "list_redemptions") == [
        ((CODE,), {"limit": 3, "offset": 2})
    ]


def test_pages_past_the_end_are_empty_with_the_total(client, city):
    body = _get(client, "?limit=5&offset=5").get_json()
    assert [i["record_id"] for i in body["items"]] == ["rec-5", "rec-6"]
    assert _get(client, "?offset=70").get_json()["items"] == []


def test_limit_defaults_to_100_and_goes_up_to_1000(client, city):
    assert _get(client).get_json()["limit"] == 100
    assert _get(client, "?limit=1000").status_code == 200


@pytest.mark.parametrize(
    "query", ["?limit=0", "?limit=1001", "?limit=x", "?offset=-1", "?format=xml"]
)
def test_a_bad_page_is_400_before_the_city_is_asked(client, city, query):
    response = _get(client, query)

    assert response.status_code == 400
    assert city.called("vouchers_shanghai", "list_redemptions") == []


def test_a_mistyped_code_is_400(client, city):
    response = client.get("/api/v1/vouchers/SH-NOTACODE/redemptions", headers=AUTH)
    assert response.status_code == 400


def test_csv_has_the_schema_columns(client, city):
    response = _get(client, "?format=csv&limit=2")

    assert response.mimetype == "text/csv"
    header, *rows = response.get_data(as_text=True).splitlines()
    assert header.split(",")[:3] == ["record_id", "datacenter_id", "tenant_id"]
    assert "status" in header.split(",") and len(rows) == 2


def test_the_voucher_view_passes_redemptions_total_through(client, city):
    body = client.get(f"/api/v1/vouchers/{CODE}", headers=AUTH).get_json()
    assert body["redemptions_total"] == 7 and len(body["redemptions"]) == 3
