"""metering's binding requests (CONTRACTS.md §6): verified like a usage record,
announced to the voucher's city as ``binding_requested``, or kept once as a
dead letter with the reason (SQLite, fake registry, publishing recorded)."""

import json
from datetime import timedelta

import nameko
import pytest
from nameko.testing.services import worker_factory
from sqlalchemy import func, select

from services.common import contracts
from services.common.errors import Unavailable
from services.common.publishing import Unroutable
from services.common.units import format_ts, utcnow
from services.datacenter_gateway import domain as gateway
from services.metering.bindings import BINDINGS_QUEUE
from services.metering.domain.bindings import event_id
from services.metering.models import DeadLetter, ParkedEvent
from services.metering.registry import CachedRegistry, RegistryCacheState
from services.metering.service import MeteringService
from tests.support.metering_data import (
    DATACENTER_ID,
    KEY_ID,
    FakeRegistry,
    raw_message,
    signed_headers,
    voucher,
)

MISSING = object()


def request_body(**overrides) -> dict:
    """A request as the gateway makes it (its own code: the two agree);
    an override ``MISSING`` leaves that field out."""
    at = utcnow() - timedelta(seconds=5)
    made = gateway.binding_request(
        DATACENTER_ID, "tenant-a", voucher("SH"), gateway.REQUEST, at
    )
    body = {**json.loads(made.body), **overrides}
    return {k: v for k, v in body.items() if v is not MISSING}


def message(body: dict | None = None, **kwargs):
    body = request_body() if body is None else body
    kwargs.setdefault("routing_key", f"{DATACENTER_ID}.binding")
    return raw_message(body, **kwargs)


@pytest.fixture
def fake():
    return FakeRegistry()


@pytest.fixture
def published():
    return []


@pytest.fixture
def service(session, fake, published):
    state = RegistryCacheState(ttl_s=30)

    def publish(events, sent=published):
        sent.extend(events)

    return worker_factory(
        MeteringService,
        db=session,
        registry_cache=lambda rpc: CachedRegistry(state, fake),
        publish=publish,
    )


def letters(session) -> list[DeadLetter]:
    return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def test_the_queue_takes_every_data_centres_binding_key():
    assert [b.routing_key for b in BINDINGS_QUEUE.bindings] == ["*.binding"]
    assert BINDINGS_QUEUE.name == "metering.bindings"


def test_a_request_is_announced_to_the_vouchers_city(service, published, session):
    body = request_body()
    assert service.handle_binding_requests([message(body)]) == []
    [(routing_key, eid, payload)] = published
    assert routing_key == "shanghai.binding_requested"
    assert eid == event_id(DATACENTER_ID, body["request_id"])
    event = contracts.load_event("binding_requested", json.loads(payload))
    assert event["event_id"] == eid
    assert event["city"] == "shanghai"
    assert {k: event[k] for k in ("voucher_code", "tenant_id", "action")} == {
        "voucher_code": body["voucher_code"],
        "tenant_id": "tenant-a",
        "action": "request",
    }
    assert event["datacenter_id"] == DATACENTER_ID
    assert format_ts(event["requested_at"]) == body["requested_at"]
    # The request's time is the event's: a redelivery is the same event.
    assert event["occurred_at"] == event["requested_at"]
    assert letters(session) == []


def test_a_redelivered_request_is_the_same_event_byte_for_byte(service, published):
    body = request_body(action="cancel")
    service.handle_binding_requests([message(body)])
    service.handle_binding_requests([message(body)])
    assert len(published) == 2
    assert published[0] == published[1]


def test_a_lower_case_code_is_announced_normalised(service, published):
    body = request_body()
    service.handle_binding_requests(
        [message(dict(body, voucher_code=body["voucher_code"].lower()))]
    )
    assert json.loads(published[0][2])["voucher_code"] == body["voucher_code"]


def _future():
    return format_ts(utcnow() + timedelta(minutes=10))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"headers": signed_headers(b"other body")}, "bad_signature"),
        ({"headers": signed_headers(b"x", KEY_ID, "another-secret")}, "bad_signature"),
        ({"headers": signed_headers(b"x", "other-dc-k1", "s")}, "bad_signature"),
        ({"user_id": "dc.another-dc"}, "wrong_publisher"),
        ({"user_id": None}, "wrong_publisher"),
        ({"routing_key": "unknown-dc.binding"}, "unknown_datacenter"),
        ({"content_type": "text/plain"}, "schema"),
        ({"body": {"action": "authorise"}}, "schema"),
        ({"body": {"action": MISSING}}, "schema"),
        ({"body": {"requested_at": MISSING}}, "schema"),
        ({"body": {"tenant_id": ""}}, "schema"),
        ({"body": {"tenant_id": "t" * 129}}, "schema"),
        ({"body": {"request_id": ""}}, "schema"),
        ({"body": {"voucher_code": "SH-AAAAAAAAAAAA-0"}}, "schema"),
        ({"body": {"voucher_code": None}}, "schema"),
        ({"body": {"requested_at": "yesterday"}}, "schema"),
        ({"body": {"requested_at": _future()}}, "schema"),
        ({"body": {"authorised": True}}, "schema"),
        ({"body": {"datacenter_id": "another-dc"}}, "datacenter_mismatch"),
        ({"body": {"voucher_code": voucher("ZZ")}}, "unknown_voucher"),
    ],
)
def test_a_request_that_breaks_a_rule_is_a_dead_letter(
    service, published, session, change, reason
):
    body = request_body(**change.pop("body", {}))
    assert service.handle_binding_requests([message(body, **change)]) == []
    assert published == []
    [letter] = letters(session)
    assert letter.reason == reason
    assert letter.routing_key.endswith(".binding")
    if body.get("request_id"):
        assert letter.record_id == body["request_id"]


def test_a_body_that_is_not_json_is_a_schema_dead_letter(service, session):
    bad = raw_message(
        body=b"{not json", routing_key=f"{DATACENTER_ID}.binding", headers=None
    )
    service.handle_binding_requests([bad])
    [letter] = letters(session)
    assert (letter.reason, letter.record_id) == ("schema", None)


def test_a_refused_request_redelivered_is_kept_once(service, session):
    refused = message(request_body(voucher_code=voucher("ZZ")))
    service.handle_binding_requests([refused, refused])
    service.handle_binding_requests([refused])
    assert [letter.reason for letter in letters(session)] == ["unknown_voucher"]


def test_the_registry_down_requeues_the_request(service, fake, published, session):
    def down(_id):
        raise Unavailable("registry_unavailable", "down")

    fake.get_datacenter = down
    assert service.handle_binding_requests([message(), message()]) == [0, 1]
    assert published == [] and letters(session) == []


def test_an_unroutable_event_ends_parked(session, fake):
    state = RegistryCacheState(ttl_s=30)

    def publish(events):
        raise Unroutable([events[0][0]])

    service = worker_factory(
        MeteringService,
        db=session,
        registry_cache=lambda rpc: CachedRegistry(state, fake),
        publish=publish,
    )
    request = message()
    with nameko.config.patch({"MAX_DELIVERY_ATTEMPTS": 2}):
        assert service.handle_binding_requests([request]) == [0]
        assert letters(session) == []
        assert service.handle_binding_requests([request]) == []
    assert letters(session) == []  # the platform's fault, not the centre's
    [parked] = session.scalars(select(ParkedEvent)).all()
    assert parked.kind == "failed" and parked.attempts == 2
    assert "shanghai.binding_requested" in parked.reason


def test_a_dead_letter_replayed_once_the_city_is_known(
    service, fake, published, session
):
    body = request_body(voucher_code=voucher("NB"))
    service.handle_binding_requests([message(body)])
    [letter] = letters(session)
    assert letter.reason == "unknown_voucher"
    assert service.replay_dead_letter(letter.id) == {
        "outcome": "dead_letter",
        "reason": "unknown_voucher",
    }
    fake.voucher_prefixes = lambda: {"SH": "shanghai", "NB": "ningbo"}
    assert service.replay_dead_letter(letter.id) == {
        "outcome": "applied",
        "reason": None,
    }
    [(routing_key, eid, _payload)] = published
    assert routing_key == "ningbo.binding_requested"
    assert eid == event_id(DATACENTER_ID, body["request_id"])
    assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1
    assert letters(session)[0].replay_outcome == "applied"


def test_a_parked_request_is_announced_by_its_replay_once_routable(session, fake):
    """The ministry replays it once the city's queue exists (issue 16): it
    is checked again from its stored headers and announced."""
    state = RegistryCacheState(ttl_s=30)
    routable = []

    def publish(events):
        events = list(events)
        if not routable:
            raise Unroutable([events[0][0]])
        routable.extend(events)

    service = worker_factory(
        MeteringService,
        db=session,
        registry_cache=lambda rpc: CachedRegistry(state, fake),
        publish=publish,
    )
    with nameko.config.patch({"MAX_DELIVERY_ATTEMPTS": 1}):
        assert service.handle_binding_requests([message()]) == []
    [parked] = service.list_parked_events()["items"]
    assert service.replay_parked_event(parked["id"])["outcome"] == "parked_again"
    routable.append(None)  # the city's queue is declared
    replayed = service.replay_parked_event(parked["id"])
    assert replayed == {"id": parked["id"], "outcome": "applied", "reason": None}
    assert routable[1][0] == "shanghai.binding_requested"
