"""The summary and city pages come from the PublicView held in memory.

Through the app: what is served, with which headers, and how often the
registry is asked. The refresh-behind timing is tested on PublicView alone,
with a fake clock, in test_publicview.py.
"""

import pytest

from gateway.api import PUBLIC_CACHE_TTL_S


@pytest.fixture
def summary(rpc):
    rpc.replies[("city_registry", "network_summary")] = lambda: {
        "cities": len(rpc.called("city_registry", "public_view")),
        "live_cities": 0,
        "datacenters": 0,
        "budget_fen": 0,
        "committed_fen": 0,
        "redeemed_fen": 0,
        "gpu_seconds": 0,
        "utilisation": None,
        "regions": {},
    }


def test_the_summary_is_fetched_once_per_ttl(client, rpc, summary):
    first = client.get("/api/v1/network/summary").get_json()
    second = client.get("/api/v1/network/summary").get_json()
    assert first == second
    assert len(rpc.called("city_registry", "public_view")) == 1
    assert rpc.called("city_registry", "network_summary") == []


def test_a_zero_ttl_asks_the_registry_every_time(app, client, rpc, summary):
    app.config[PUBLIC_CACHE_TTL_S] = 0
    client.get("/api/v1/network/summary")
    client.get("/api/v1/network/summary")
    assert rpc.called("city_registry", "public_view") == []
    assert len(rpc.called("city_registry", "network_summary")) == 2


def test_every_city_page_comes_from_one_answer(client, rpc, summary, city_factory):
    cities = [city_factory(code=code) for code in ("shanghai", "chengdu")]
    rpc.replies[("city_registry", "list_cities")] = cities
    for city in (*cities, cities[0]):
        assert client.get(f"/api/v1/cities/{city['code']}").get_json() == city
    assert len(rpc.called("city_registry", "public_view")) == 1
    assert rpc.called("city_registry", "get_city") == []


def test_the_served_bytes_are_what_jsonify_would_send(client, rpc, summary, app):
    body = client.get("/api/v1/network/summary")
    app.config[PUBLIC_CACHE_TTL_S] = 0
    asked = client.get("/api/v1/network/summary")
    # Same figures (the fake counts public_view calls, which stay 1).
    assert body.get_data() == asked.get_data()
    assert body.mimetype == "application/json"


def test_an_unchanged_view_answers_304_to_its_etag(client, rpc, summary):
    first = client.get("/api/v1/network/summary")
    assert first.headers["ETag"]
    assert "public" in first.headers["Cache-Control"]
    again = client.get(
        "/api/v1/network/summary", headers={"If-None-Match": first.headers["ETag"]}
    )
    assert again.status_code == 304
    assert again.get_data() == b""


def test_an_unreachable_registry_at_first_read_is_503(client, rpc):
    from nameko.exceptions import RpcTimeout

    rpc.replies[("city_registry", "public_view")] = RpcTimeout()
    response = client.get("/api/v1/network/summary")
    assert response.status_code == 503
    assert response.get_json()["error"] == "service_unavailable"
