"""The integrity view (``GET /api/v1/integrity``, the dashboard's
``/integrity``) shows each principal only its part (gateway/integrity.py):
the ministry everything, a city's staff every data centre and their own
review queue, a data centre its own row and no queue, a company and the
anonymous nothing."""

from __future__ import annotations

import pytest

from tests.security.conftest import HOLDER

COUNTS = {
    "dc-a": {
        "24h": {"records": 9, "dead_letters": {"exceeds_inventory": 1}},
        "7d": {"records": 9, "dead_letters": {"exceeds_inventory": 1}},
    },
    "dc-b": {
        "24h": {"records": 4, "dead_letters": {}},
        "7d": {"records": 4, "dead_letters": {}},
    },
}
QUEUES = [
    {"city": "beijing", "waiting": 1, "subsidy_fen": 5, "oldest_held_at": None},
    {"city": "shanghai", "waiting": 2, "subsidy_fen": 9, "oldest_held_at": None},
]


@pytest.fixture
def integrity(rpc, network):
    rpc.replies[("metering", "integrity_counts")] = lambda: COUNTS

    def refusal_counts(since, datacenter_id=None):
        rows = [
            {
                "datacenter_id": "dc-a",
                "kind": "held",
                "reason": "over_capacity",
                "count": 2,
            },
            {"datacenter_id": "dc-b", "kind": "refused", "reason": "x", "count": 1},
        ]
        return [r for r in rows if datacenter_id in (None, r["datacenter_id"])]

    rpc.replies[("city_registry", "city_refusal_counts")] = refusal_counts
    rpc.replies[("city_registry", "review_queues")] = lambda city=None: [
        q for q in QUEUES if city in (None, q["city"])
    ]
    return rpc


def _get(client, headers):
    return client.get("/api/v1/integrity", headers=headers)


def test_the_ministry_sees_every_data_centre_and_queue(client, integrity, token_for):
    body = _get(client, token_for("national_admin")).get_json()

    assert [row["datacenter_id"] for row in body["datacenters"]] == ["dc-a", "dc-b"]
    assert body["datacenters"][0]["24h"]["held_share"] == 0.2
    assert [q["city"] for q in body["review_queues"]] == ["beijing", "shanghai"]


def test_a_city_sees_every_data_centre_and_only_its_queue(client, integrity, token_for):
    body = _get(client, token_for("city_admin:shanghai")).get_json()

    assert [row["datacenter_id"] for row in body["datacenters"]] == ["dc-a", "dc-b"]
    assert [q["city"] for q in body["review_queues"]] == ["shanghai"]


def test_a_data_centre_sees_only_its_own_row(client, integrity, token_for):
    body = _get(client, token_for("datacenter:dc-b")).get_json()

    assert [row["datacenter_id"] for row in body["datacenters"]] == ["dc-b"]
    assert body["datacenters"][0]["24h"]["refused"] == 1
    assert body["review_queues"] == []
    # the registry was asked for its refusals only
    asked = integrity.called("city_registry", "city_refusal_counts")
    assert {kwargs["datacenter_id"] for _, kwargs in asked} == {"dc-b"}
    assert integrity.called("city_registry", "review_queues") == []


@pytest.mark.parametrize("role, status", [(None, 401), (f"company:{HOLDER}", 403)])
def test_others_see_nothing(client, integrity, token_for, role, status):
    response = _get(client, token_for(role) if role else {})

    assert response.status_code == status
    assert integrity.called("metering", "integrity_counts") == []


def test_the_page_asks_to_sign_in_and_shows_a_city_its_part(
    client, integrity, token_for
):
    asked = client.get("/integrity")
    assert asked.status_code == 302
    assert asked.headers["Location"] == "/login?next=/integrity"

    token = token_for("city_admin:shanghai")["Authorization"].split()[1]
    client.post("/login", data={"token": token})
    page = client.get("/integrity").get_data(as_text=True)

    assert 'id="review-queues"' in page and "beijing" not in page
    assert "dc-a" in page and "over_capacity" in page


def test_a_company_signed_in_is_refused_the_page(client, integrity, token_for):
    token = token_for(f"company:{HOLDER}")["Authorization"].split()[1]
    client.post("/login", data={"token": token})

    assert client.get("/integrity").status_code == 403
