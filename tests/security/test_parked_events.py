"""Parked events (``/api/v1/parked-events``): the registry's and metering's
are the ministry's alone (a parked event there may be any city's, and its
replay moves the national figures); a city's (``service=<city>``) are its
own admin's and the ministry's. Each refusal beside the national admin's
success; a refused caller never reaches the replay."""

from __future__ import annotations

import pytest

from tests.security.conftest import HOLDER

OTHERS = [
    (None, 401),
    ("city_admin:shanghai", 403),
    ("datacenter:guian-gov-01", 403),
    (f"company:{HOLDER}", 403),
]


@pytest.fixture
def registry(rpc):
    rpc.replies[("city_registry", "list_parked_events")] = lambda **kw: {
        "items": [],
        "total": 0,
    }
    rpc.replies[("city_registry", "replay_parked_event")] = lambda parked_id: {
        "id": parked_id,
        "outcome": "applied",
        "reason": None,
    }
    return rpc


def test_the_national_admin_lists_and_replays(client, registry, token_for):
    headers = token_for("national_admin")

    listed = client.get("/api/v1/parked-events?kind=failed", headers=headers)
    replayed = client.post("/api/v1/parked-events/3/replay", headers=headers)

    assert listed.status_code == 200 and listed.get_json()["total"] == 0
    assert replayed.status_code == 200 and replayed.get_json()["outcome"] == "applied"
    assert registry.called("city_registry", "replay_parked_event") == [((3,), {})]


@pytest.mark.parametrize("role, status", OTHERS)
def test_nobody_else_lists_or_replays(client, registry, token_for, role, status):
    headers = token_for(role) if role else {}

    listed = client.get("/api/v1/parked-events", headers=headers)
    replayed = client.post("/api/v1/parked-events/3/replay", headers=headers)

    assert (listed.status_code, replayed.status_code) == (status, status)
    assert registry.called("city_registry", "replay_parked_event") == []
    assert registry.called("city_registry", "list_parked_events") == []


def test_an_unknown_kind_is_400(client, registry, token_for):
    response = client.get(
        "/api/v1/parked-events?kind=lost", headers=token_for("national_admin")
    )

    assert response.status_code == 400


def _replies(rpc, service):
    rpc.replies[(service, "list_parked_events")] = lambda **kw: {
        "items": [],
        "total": 0,
    }
    rpc.replies[(service, "replay_parked_event")] = lambda parked_id: {
        "id": parked_id,
        "outcome": "applied",
        "reason": None,
    }


@pytest.mark.parametrize(
    "role, service, status",
    [
        ("national_admin", "metering", 200),
        ("national_admin", "shanghai", 200),
        ("city_admin:shanghai", "shanghai", 200),
        ("city_admin:shanghai", "metering", 403),
        ("city_admin:shanghai", "registry", 403),
        ("city_admin:chengdu", "shanghai", 403),
        ("datacenter:guian-gov-01", "shanghai", 403),
        ("datacenter:guian-gov-01", "metering", 403),
        (f"company:{HOLDER}", "shanghai", 403),
        (f"company:{HOLDER}", "metering", 403),
        (None, "shanghai", 401),
    ],
)
def test_whose_parked_events_by_service(
    client, rpc, network, token_for, role, service, status
):
    rpc_name = "metering" if service == "metering" else f"vouchers_{service}"
    _replies(rpc, rpc_name)
    _replies(rpc, "city_registry")
    headers = token_for(role) if role else {}

    listed = client.get(f"/api/v1/parked-events?service={service}", headers=headers)
    replayed = client.post(
        f"/api/v1/parked-events/3/replay?service={service}", headers=headers
    )

    assert (listed.status_code, replayed.status_code) == (status, status)
    replays = rpc.called(rpc_name, "replay_parked_event")
    assert replays == ([((3,), {})] if status == 200 else [])
    if status == 200:
        assert listed.get_json()["total"] == 0
    assert rpc.called("city_registry", "replay_parked_event") == []


def test_an_unknown_city_is_404_for_the_ministry(client, rpc, network, token_for):
    response = client.get(
        "/api/v1/parked-events?service=atlantis", headers=token_for("national_admin")
    )

    assert response.status_code == 404
