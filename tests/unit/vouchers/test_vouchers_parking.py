"""The city's usage queue never stalls on one message (issue 16): on a real
ledger (SQLite), a batch holding a record the database refuses (a cost of
2⁶³ fen, valid by the schema) is booked one by one: the good records go
through, the poison one is requeued alone, counted, and parked on its
``MAX_DELIVERY_ATTEMPTS``-th failure; a body not of the contract is parked
at once; a database outage is retried whole, uncounted; a replay applies a
parked message once its cause is gone."""

from __future__ import annotations

import json

import nameko
import pytest
from cachetools import TTLCache
from sqlalchemy import exc as sa_exc
from sqlalchemy import select

from services.common import parking
from services.common.amqp import RawMessage
from services.common.batching import Requeue
from services.common.errors import Conflict
from services.vouchers.binding_entrypoints import BindingEntrypoints
from services.vouchers.ledger import CityLedger
from services.vouchers.models import ParkedEvent, Redemption
from services.vouchers.parking import UsageQueueParking
from services.vouchers.review_rpc import ReviewEntrypoints
from tests.support.vouchers_books import funded_books
from tests.support.vouchers_data import EAST_COMMERCIAL, rated

CITY = "testcity"
POISON_FEN = 2**63  # valid by the schema; no INTEGER column holds it


class Confirmed:
    def __init__(self, events):
        self.events = events

    def wait(self, timeout=None):
        return None


class Service(BindingEntrypoints, ReviewEntrypoints, UsageQueueParking):
    """The entrypoints' code on a real ledger; publishing recorded."""

    city = CITY

    def __init__(self, session, rules):
        self.ledger = CityLedger(session, rules)
        self.attempts = TTLCache(maxsize=100, ttl=60)
        self.published = []

    def _publish_outbox(self, events):
        self.published.extend(row.event for row in events)

    def publish_with_outbox(self, events, rows):
        self.published.extend(event_id for _key, event_id, _body in events)
        return Confirmed(events)


@pytest.fixture
def books(city_rules):
    engine, session, codes = funded_books(city_rules)
    yield session, codes
    session.close()
    engine.dispose()


@pytest.fixture
def service(books, city_rules):
    return Service(books[0], city_rules)


def message(body, routing_key=f"{CITY}.usage_rated", headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawMessage(raw, headers or {}, {}, routing_key, False)


def usage(code, record_id, cost_fen=1_000):
    return message(
        rated(
            code, record_id, cost_fen, EAST_COMMERCIAL, city=CITY, datacenter_id="dc-a"
        )
    )


def booked(session):
    return sorted(r.record_id for r in session.scalars(select(Redemption)))


def parked(session):
    return session.scalars(select(ParkedEvent).order_by(ParkedEvent.id)).all()


def test_a_good_batch_is_booked_whole_and_confirmed(service, books):
    session, codes = books
    result = service.book_or_park([usage(codes[0], "a"), usage(codes[0], "b")])
    assert isinstance(result, Confirmed) and len(result.events) == 2
    assert booked(session) == ["a", "b"] and parked(session) == []


def test_a_poison_record_is_requeued_alone_while_its_batch_is_booked(service, books):
    session, codes = books
    batch = [usage(codes[0], "a"), usage(codes[0], "poison", POISON_FEN)]
    batch.append(usage(codes[0], "b"))
    result = service.book_or_park(batch)
    assert isinstance(result, Requeue)
    assert result.indices == {1}  # only the poison one is tried again
    assert len(result.confirmation.events) == 2  # the others' events, confirmed
    assert booked(session) == ["a", "b"]
    assert parked(session) == []


def test_a_poison_record_is_parked_on_its_last_attempt(service, books):
    session, codes = books
    poison = usage(codes[0], "poison", POISON_FEN)
    for attempt in range(1, parking.DEFAULT_MAX_ATTEMPTS):
        result = service.book_or_park([poison, usage(codes[0], f"ok-{attempt}")])
        assert isinstance(result, Requeue) and result.indices == {0}
    result = service.book_or_park([poison, usage(codes[0], "last")])
    assert not isinstance(result, Requeue)  # acked: the stream goes on
    [row] = parked(session)
    assert (row.kind, row.attempts) == ("failed", parking.DEFAULT_MAX_ATTEMPTS)
    assert row.event_id == "rated-poison" and row.routing_key == f"{CITY}.usage_rated"
    assert "OverflowError" in row.reason or "DataError" in row.reason
    assert "poison" not in booked(session)
    assert len(booked(session)) == parking.DEFAULT_MAX_ATTEMPTS
    assert service.attempts == {}  # forgotten once parked


def test_the_limit_is_configured_and_the_brokers_count_counts(service, books):
    session, codes = books
    with nameko.config.patch({parking.MAX_DELIVERY_ATTEMPTS: 2}):
        poison = usage(codes[0], "poison", POISON_FEN)
        assert isinstance(service.book_or_park([poison]), Requeue)
        assert not isinstance(service.book_or_park([poison]), Requeue)
    assert parked(session)[0].attempts == 2
    # A quorum queue's count survives a restart of the service (a new count).
    counted = message(json.loads(poison.body) | {"event_id": "other"})
    counted.headers["x-delivery-count"] = parking.DEFAULT_MAX_ATTEMPTS - 1
    service.book_or_park([counted])
    assert parked(session)[1].attempts == parking.DEFAULT_MAX_ATTEMPTS


@pytest.mark.parametrize(
    "body, routing_key",
    [
        (b"{not json", f"{CITY}.usage_rated"),
        ({"event_id": "e-1", "city": CITY}, f"{CITY}.usage_rated"),
        ({"event_id": "b-1", "city": CITY}, f"{CITY}.binding_requested"),
        ([1, 2, 3], f"{CITY}.usage_hold"),
    ],
    ids=["not-json", "usage-rated", "binding-requested", "usage-hold"],
)
def test_a_message_not_of_the_contract_is_parked_at_once(
    service, books, body, routing_key
):
    session, codes = books
    service.book_or_park([message(body, routing_key), usage(codes[0], "a")])
    [row] = parked(session)
    assert (row.kind, row.attempts, row.routing_key) == ("rejected", 1, routing_key)
    assert row.reason.startswith("schema: ")
    assert booked(session) == ["a"]  # and the batch behind it is booked


@pytest.mark.parametrize(
    "fault",
    [
        sa_exc.OperationalError("SELECT 1", {}, Exception("server closed")),
        sa_exc.InterfaceError("SELECT 1", {}, Exception("connection lost")),
        sa_exc.DBAPIError(
            "SELECT 1", {}, Exception("gone"), connection_invalidated=True
        ),
    ],
    ids=["operational", "interface", "disconnect"],
)
def test_a_database_outage_is_retried_whole_without_counting(
    service, books, monkeypatch, fault
):
    session, codes = books

    def down(records):
        raise fault

    monkeypatch.setattr(service.ledger, "book_usage_batch", down)
    batch = [usage(codes[0], "a"), usage(codes[0], "b")]
    for _ in range(parking.DEFAULT_MAX_ATTEMPTS * 2):
        with pytest.raises(type(fault)):
            service.book_or_park(batch)
    with pytest.raises(type(fault)):  # a batch of one, booked alone
        service.book_or_park(batch[:1])
    assert parked(session) == [] and service.attempts == {}


def test_an_outage_during_the_fallback_requeues_the_rest_uncounted(
    service, books, monkeypatch
):
    session, codes = books
    real = service.ledger.book_usage_batch
    calls = []

    def flaky(records):
        calls.append(len(records))
        if len(records) > 1:
            raise ValueError("a bug")
        if len(calls) > 2:
            raise sa_exc.OperationalError("SELECT 1", {}, Exception("gone"))
        return real(records)

    monkeypatch.setattr(service.ledger, "book_usage_batch", flaky)
    batch = [usage(codes[0], name) for name in ("a", "b", "c")]
    result = service.book_or_park(batch)
    assert result.indices == {1, 2}
    assert booked(session) == ["a"] and service.attempts == {}


def test_a_parked_record_is_booked_by_its_replay_once_its_cause_is_gone(
    service, books, monkeypatch
):
    session, codes = books
    real = service.ledger.book_usage_batch
    broken = True

    def until_fixed(records):
        if broken:
            raise ValueError("a bug in the rules")
        return real(records)

    monkeypatch.setattr(service.ledger, "book_usage_batch", until_fixed)
    fine = usage(codes[0], "fine")
    for _ in range(parking.DEFAULT_MAX_ATTEMPTS):
        service.book_or_park([fine])
    [row] = parked(session)
    assert row.reason == "ValueError: a bug in the rules"

    again = service.replay_parked_event(row.id)
    assert again["outcome"] == "parked_again" and "a bug" in again["reason"]
    listed = service.list_parked_events()
    assert listed["total"] == 1 and listed["items"][0]["outcome"] == "parked_again"

    broken = False  # the operator fixed the cause
    published_before = len(service.published)
    assert service.replay_parked_event(row.id) == {
        "id": row.id,
        "outcome": "applied",
        "reason": None,
    }
    assert booked(session) == ["fine"]
    assert len(service.published) == published_before + 1  # its voucher_redeemed
    with pytest.raises(Conflict):
        service.replay_parked_event(row.id)  # once


def test_a_replay_of_what_was_booked_since_is_a_duplicate(service, books):
    session, codes = books
    record = usage(codes[0], "twice")
    service.book_or_park([record])
    parked_id = service.park(record, parking.FAILED, "by hand", 5)
    assert service.replay_parked_event(parked_id)["outcome"] == "duplicate"


def test_the_listing_pages_and_filters_by_kind(service, books):
    session, codes = books
    service.book_or_park([message(b"{", f"{CITY}.usage_rated")])
    service.park(usage(codes[0], "x"), parking.FAILED, "by hand", 5)
    assert service.list_parked_events(kind="rejected")["total"] == 1
    page = service.list_parked_events(limit=1)
    assert page["total"] == 2 and len(page["items"]) == 1
    assert page["items"][0]["kind"] == "failed"  # newest first
    assert page["items"][0]["parked_at"].endswith("Z")
    assert "body" not in page["items"][0]
