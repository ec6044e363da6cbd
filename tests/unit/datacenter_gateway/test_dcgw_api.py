"""The agent API (CONTRACTS.md §6) over a SQLite outbox, no broker."""

import json

import pytest

from services.common.contracts import UsageRecordSchema, canonical_json
from services.common.errors import ComputenetError
from services.common.http_errors import ERROR_TABLE
from services.common.vouchercode import generate

DC = "guian-gov-01"


def stored(outbox):
    return {row.record_id: json.loads(row.body) for row in outbox.pending(10_000)}


def test_valid_batch_is_stored_and_acknowledged(client, outbox, record_factory):
    records = [record_factory(), record_factory(voucher_code=None)]
    response = client.post("/v1/usage", json=records)
    assert response.status_code == 202
    assert response.get_json() == {"accepted": 2, "duplicates": 0}
    bodies = stored(outbox)
    assert set(bodies) == {r["record_id"] for r in records}
    assert all(body["datacenter_id"] == DC for body in bodies.values())


def test_body_is_the_canonical_json_of_the_contract_record(
    client, outbox, record_factory
):
    record = record_factory()
    client.post("/v1/usage", json=[record])
    (row,) = outbox.pending(10)
    expected = UsageRecordSchema().load({**record, "datacenter_id": DC})
    assert row.body == canonical_json(UsageRecordSchema().dump(expected))


def test_invalid_records_are_reported_per_index_and_none_stored(
    client, outbox, record_factory
):
    records = [
        record_factory(),
        record_factory(gpu_count=0),
        record_factory(gpu_seconds=10**12),
        record_factory(gpu_model="TPUv9"),
        "not a record",
    ]
    response = client.post("/v1/usage", json=records)
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == "invalid_records"
    assert set(body["details"]) == {"1", "2", "3", "4"}
    assert "gpu_count" in body["details"]["1"]
    assert "gpu_seconds" in body["details"]["2"]
    assert "gpu_model" in body["details"]["3"]
    assert outbox.backlog(fresh=True) == 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"datacenter_id": "someone-else"}, "datacenter_id"),
        ({"voucher_code": "SH-AAAAAAAAAAAA-0"}, "voucher_code"),
        ({"unexpected": 1}, "unexpected"),
        ({"source": ""}, "source"),
    ],
)
def test_record_rules(client, record_factory, overrides, field):
    response = client.post("/v1/usage", json=[record_factory(**overrides)])
    assert response.status_code == 400
    assert field in response.get_json()["details"]["0"]


def test_body_must_be_an_array(client):
    response = client.post("/v1/usage", json={"record_id": "x"})
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_same_record_again_is_a_duplicate_not_stored_twice(
    client, outbox, record_factory
):
    first, second = record_factory(), record_factory()
    assert client.post("/v1/usage", json=[first]).status_code == 202
    response = client.post("/v1/usage", json=[first, second, second])
    assert response.status_code == 202
    assert response.get_json() == {"accepted": 1, "duplicates": 2}
    assert outbox.backlog(fresh=True) == 2


def test_conflicting_body_is_409_and_stores_nothing_of_the_batch(
    client, outbox, record_factory
):
    first = record_factory()
    client.post("/v1/usage", json=[first])
    changed = {**first, "gpu_seconds": first["gpu_seconds"] - 1}
    response = client.post("/v1/usage", json=[record_factory(), changed])
    assert response.status_code == 409
    body = response.get_json()
    assert body["error"] == "conflicting_record"
    assert set(body["details"]) == {"1"}
    assert outbox.backlog(fresh=True) == 1


def test_tenant_voucher_is_applied_to_records_without_one(
    client, outbox, record_factory, voucher_code
):
    response = client.put(
        "/v1/tenants/acme/voucher", json={"voucher_code": voucher_code}
    )
    assert response.status_code == 200
    own = generate("BJ")
    records = [
        record_factory(),
        record_factory(voucher_code=own),
        record_factory(tenant_id="other"),
    ]
    client.post("/v1/usage", json=records)
    bodies = stored(outbox)
    assert bodies[records[0]["record_id"]]["voucher_code"] == voucher_code
    assert bodies[records[1]["record_id"]]["voucher_code"] == own
    assert bodies[records[2]["record_id"]]["voucher_code"] is None


def test_retry_after_voucher_change_is_still_a_duplicate(
    client, outbox, record_factory, voucher_code
):
    record = record_factory()
    client.post("/v1/usage", json=[record])
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    response = client.post("/v1/usage", json=[record])
    assert response.status_code == 202
    assert response.get_json() == {"accepted": 0, "duplicates": 1}


def test_voucher_handover_lifecycle(client, voucher_code):
    bad = client.put("/v1/tenants/acme/voucher", json={"voucher_code": "SH-NOPE"})
    assert bad.status_code == 400
    assert bad.get_json()["error"] == "invalid_voucher_code"
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code.lower()})
    got = client.get("/v1/tenants/acme/voucher").get_json()
    assert got == {"tenant_id": "acme", "voucher_code": voucher_code}
    assert client.delete("/v1/tenants/acme/voucher").status_code == 204
    assert client.get("/v1/tenants/acme/voucher").status_code == 404


def test_token_is_required_when_configured(make_client, record_factory):
    client = make_client(AGENT_TOKEN="s3cret")
    assert client.get("/v1/status").status_code == 401
    wrong = client.post(
        "/v1/usage", json=[record_factory()], headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    assert wrong.get_json()["error"] == "unauthorized"
    ok = client.get("/v1/status", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_back_pressure_when_backlog_exceeds_the_limit(make_client, record_factory):
    client = make_client(MAX_BACKLOG=2)
    client.post("/v1/usage", json=[record_factory() for _ in range(3)])
    response = client.post("/v1/usage", json=[record_factory()])
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.get_json()["error"] == "backlog_full"


def test_status_reports_the_backlog(client, record_factory):
    client.post("/v1/usage", json=[record_factory(), record_factory()])
    status = client.get("/v1/status").get_json()
    assert status["datacenter_id"] == DC
    assert status["key_id"] == "k1"
    assert status["backlog"] == 2
    assert status["oldest_unsent_age_s"] >= 0
    assert status["broker_reachable"] is False
    assert status["published_total"] == 0
    assert status["last_confirm_at"] is None


def test_unknown_route_is_a_json_error(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert set(response.get_json()) == {"error", "message", "details"}


@pytest.mark.parametrize(
    ("error_class", "status"),
    [
        (cls, status)
        for cls, status, _ in ERROR_TABLE
        if issubclass(cls, ComputenetError)
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else str(value),
)
def test_service_errors_have_the_portals_status(client, error_class, status):
    """The agent API answers each error class with the one table's status
    (a Forbidden was a 500 here while the portal answered 403)."""

    def fail():
        raise error_class("some_code", "what went wrong", {"x": 1})

    client.application.add_url_rule("/v1/fail", view_func=fail)
    response = client.get("/v1/fail")
    assert response.status_code == status
    assert response.get_json() == {
        "error": "some_code",
        "message": "what went wrong",
        "details": {"x": 1},
    }


def test_gpu_uuids_are_accepted_and_published_as_sent(client, outbox, record_factory):
    uuids = ["GPU-5c7e1f2a-0b1c-4d2e-8f3a-1b2c3d4e5f60", "MIG-9d03b6e4-77aa"]
    named = record_factory(gpu_count=2, gpu_seconds=7200, gpu_uuids=uuids)
    plain = record_factory()
    response = client.post("/v1/usage", json=[named, plain])
    assert response.status_code == 202, response.get_json()
    bodies = stored(outbox)
    assert bodies[named["record_id"]]["gpu_uuids"] == uuids
    # a record without them is published as before the field existed
    assert "gpu_uuids" not in bodies[plain["record_id"]]


@pytest.mark.parametrize(
    "uuids",
    [["GPU-1"], ["GPU-1", "GPU-1"], ["GPU-1", "nvidia0"], "GPU-1,GPU-2", [1, 2]],
)
def test_malformed_gpu_uuids_are_refused(client, outbox, record_factory, uuids):
    bad = record_factory(gpu_count=2, gpu_seconds=7200, gpu_uuids=uuids)
    response = client.post("/v1/usage", json=[bad])
    assert response.status_code == 400
    assert "gpu_uuids" in response.get_json()["details"]["0"]
    assert outbox.backlog(fresh=True) == 0
