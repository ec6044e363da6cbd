"""The review queue, clawbacks and the cities' refusals (issue 15) belong to
their city and their data centre (DESIGN.md §8): another city's staff, a
data centre and a company can neither list, decide nor claw back; a data
centre sees only its own refusals; a replay is the national admin's. Each
refusal beside the callers who must still get through.
"""

from __future__ import annotations

import pytest

from gateway.auth import Role
from tests.security.conftest import HOLDER

HELD = {
    "datacenter_id": "dc-1",
    "record_id": "rec-1",
    "voucher_code": None,
    "reason": "over_capacity",
    "evidence": {"inventory": 8},
    "gpu_seconds": 3600,
    "cost_fen": 10_000,
    "subsidy_fen": 8_000,
    "status": "held",
    "held_at": "2026-12-01T08:00:00Z",
}
REFUSAL = {
    "id": 3,
    "city": "shanghai",
    "datacenter_id": "dc-1",
    "record_id": "rec-9",
    "voucher_code": None,
    "reason": "tenant_not_authorised",
    "detail": "voucher",
    "refused_at": "2026-12-01T09:00:00Z",
    "replayed_at": None,
    "replay_outcome": None,
}


def company_role() -> str:
    """The holder's role: ``company:<credit code>`` (the contract) where the
    portal reads that shape, else the shape it reads today."""
    role = f"company:{HOLDER}"
    return role if Role.parse(role) is not None else f"company:shanghai:{HOLDER}"


@pytest.fixture
def review(rpc, network):
    rpc.replies.update(
        {
            ("vouchers_shanghai", "list_held"): lambda **kw: {
                "items": [HELD],
                "total": 1,
            },
            ("vouchers_shanghai", "decide_held"): lambda *a: dict(
                HELD, status="released", decided_by=a[4]
            ),
            ("vouchers_shanghai", "claw_back"): lambda *a, **kw: {
                "datacenter_id": a[0],
                "record_id": a[1],
                "voucher_code": kw["voucher_code"],
                "clawed_back_fen": 8_000,
                "status": "clawed_back",
                "actor": a[3],
                "reason": a[2],
            },
            ("metering", "list_dead_letters"): lambda **kw: [],
            ("city_registry", "list_city_refusals"): lambda **kw: {
                "items": [REFUSAL]
                if kw["datacenter_id"] in (None, REFUSAL["datacenter_id"])
                else [],
                "total": 1,
            },
            ("city_registry", "get_city_refusal"): lambda n: REFUSAL,
            ("city_registry", "mark_refusal_replayed"): lambda n: REFUSAL,
            ("metering", "replay_rated"): lambda dc, record: {
                "outcome": "sent",
                "event_id": "ev-1",
            },
        }
    )
    return network


DECISION = "/api/v1/cities/shanghai/held/dc-1/rec-1/decision"
STAFF = ["national_admin", "city_admin:shanghai"]
OUTSIDERS = ["city_admin:beijing", "datacenter:dc-1", "company"]


def _role(role: str) -> str:
    return company_role() if role == "company" else role


def _clawback(code: str) -> str:
    return f"/api/v1/vouchers/{code}/clawbacks"


CLAWBACK = {"datacenter_id": "dc-1", "record_id": "rec-1", "reason": "ghost job"}


@pytest.mark.parametrize("role", STAFF)
def test_the_city_and_national_review_and_claw_back(
    client, rpc, review, token_for, role
):
    headers = token_for(role)
    listed = client.get("/api/v1/cities/shanghai/held", headers=headers)
    decided = client.post(
        DECISION, json={"decision": "release", "reason": "checked"}, headers=headers
    )
    clawed = client.post(_clawback(review["code"]), json=CLAWBACK, headers=headers)

    assert listed.status_code == 200 and listed.get_json()["total"] == 1
    assert decided.status_code == 200 and decided.get_json()["decided_by"] == role
    assert clawed.status_code == 201 and clawed.get_json()["actor"] == role
    # The clawback names the path's voucher: a record of another is not taken.
    [(_args, kwargs)] = rpc.called("vouchers_shanghai", "claw_back")
    assert kwargs["voucher_code"] == review["code"]


@pytest.mark.parametrize("role", OUTSIDERS)
def test_others_can_neither_list_decide_nor_claw_back(
    client, rpc, review, token_for, role
):
    headers = token_for(_role(role))
    answers = [
        client.get("/api/v1/cities/shanghai/held", headers=headers),
        client.post(
            DECISION, json={"decision": "refuse", "reason": "x"}, headers=headers
        ),
        client.post(_clawback(review["code"]), json=CLAWBACK, headers=headers),
    ]

    assert [a.status_code for a in answers] == [403, 403, 403]
    for method in ("list_held", "decide_held", "claw_back"):
        assert rpc.called("vouchers_shanghai", method) == []


def test_anonymous_is_refused_before_the_city_is_asked(client, rpc, review):
    assert client.get("/api/v1/cities/shanghai/held").status_code == 401
    assert client.post(DECISION, json={}).status_code == 401
    assert client.post(_clawback(review["code"]), json=CLAWBACK).status_code == 401
    assert rpc.called("vouchers_shanghai", "decide_held") == []


def test_a_data_centre_sees_its_own_refusals_only(client, rpc, review, token_for):
    own = client.get("/api/v1/dead-letters", headers=token_for("datacenter:dc-1"))
    other = client.get("/api/v1/dead-letters", headers=token_for("datacenter:dc-2"))
    spying = client.get(
        "/api/v1/dead-letters?datacenter_id=dc-1", headers=token_for("datacenter:dc-2")
    )

    assert own.status_code == 200
    [item] = own.get_json()["items"]
    assert (item["id"], item["source"]) == ("city:3", "shanghai")
    assert other.status_code == 200 and other.get_json()["items"] == []
    assert spying.status_code == 403
    asked = [
        kw["datacenter_id"]
        for _a, kw in rpc.called("city_registry", "list_city_refusals")
    ]
    assert asked == ["dc-1", "dc-2"]


@pytest.mark.parametrize("role", ["city_admin:shanghai", "company"])
def test_refusals_are_not_for_cities_or_companies(client, rpc, review, token_for, role):
    response = client.get("/api/v1/dead-letters", headers=token_for(_role(role)))

    assert response.status_code == 403
    assert rpc.called("city_registry", "list_city_refusals") == []


@pytest.mark.parametrize(
    ("role", "status"),
    [
        ("national_admin", 200),
        ("datacenter:dc-1", 403),
        ("city_admin:shanghai", 403),
        ("company", 403),
    ],
)
def test_only_the_national_admin_replays_a_refusal(
    client, rpc, review, token_for, role, status
):
    response = client.post(
        "/api/v1/dead-letters/city:3/replay", headers=token_for(_role(role))
    )

    assert response.status_code == status
    sent = rpc.called("metering", "replay_rated")
    assert sent == ([(("dc-1", "rec-9"), {})] if status == 200 else [])
