"""Public aggregates are served from a short-lived cache; nothing else is."""

import pytest

from gateway.api import PUBLIC_CACHE_TTL_S


@pytest.fixture
def summary(rpc):
    rpc.replies[("city_registry", "network_summary")] = lambda: {
        "cities": len(rpc.called("city_registry", "network_summary")),
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
    assert len(rpc.called("city_registry", "network_summary")) == 1


def test_a_zero_ttl_turns_the_cache_off(app, client, rpc, summary):
    app.config[PUBLIC_CACHE_TTL_S] = 0
    client.get("/api/v1/network/summary")
    client.get("/api/v1/network/summary")
    assert len(rpc.called("city_registry", "network_summary")) == 2


def test_cities_are_cached_one_by_one(app, client, rpc):
    rpc.replies[("city_registry", "get_city")] = lambda code: {
        "code": code,
        "name": code,
    }
    for code in ("shanghai", "chengdu", "shanghai"):
        assert client.get(f"/api/v1/cities/{code}").get_json()["code"] == code
    assert [a for a, _ in rpc.called("city_registry", "get_city")] == [
        ("shanghai",),
        ("chengdu",),
    ]
