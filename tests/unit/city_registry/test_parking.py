"""The registry consumer's bounded retries (services/city_registry/parking.py),
on a stand-in store: what is retried, what is counted, when it is parked."""

from __future__ import annotations

import json
import threading

import pytest
from cachetools import TTLCache
from sqlalchemy import exc as sa_exc

from services.city_registry import parking
from services.common.amqp import RawMessage
from services.common.contracts import make_event
from services.common.errors import Conflict

GOOD = make_event("heartbeat", "shanghai", "h-1", version="1", uptime_s=3)


class Store:
    def __init__(self, fail_with=None):
        self.fail_with = fail_with
        self.applied, self.parked, self.marked = [], [], []

    def apply_event(self, event, body, now):
        if self.fail_with is not None:
            raise self.fail_with
        self.applied.append(body["event_id"])
        return True

    def park(self, routing_key, body, event_id, kind, reason, attempts, now):
        self.parked.append((event_id, kind, attempts, reason))
        return len(self.parked)

    def parked_event(self, parked_id):
        event_id, kind, attempts, reason = self.parked[parked_id - 1]
        return {
            "id": parked_id,
            "routing_key": "shanghai.heartbeat",
            "body": json.dumps(GOOD),
            "replayed_at": None if not self.marked else "then",
            "outcome": self.marked[-1] if self.marked else None,
        }

    def mark_parked_replayed(self, parked_id, outcome, now):
        self.marked.append(outcome)


class Service(parking.ParkedEvents):
    outage_pause_s = 0

    def __init__(self, store):
        self.store = store
        self.projection_lock = threading.Lock()
        self.attempts = TTLCache(maxsize=100, ttl=60)

    def _assigned_prefix(self, city):
        return "SH"


def message(body=GOOD, headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawMessage(
        body=raw,
        headers=headers or {},
        properties={},
        routing_key="shanghai.heartbeat",
        redelivered=False,
    )


def test_a_good_event_is_applied():
    service = Service(Store())
    service.project_or_park(message())
    assert service.store.applied == ["h-1"] and service.store.parked == []


def test_a_failing_event_is_retried_then_parked_on_its_last_attempt():
    service = Service(Store(fail_with=ValueError("integer out of range")))
    for _ in range(parking.MAX_ATTEMPTS - 1):
        with pytest.raises(ValueError):
            service.project_or_park(message())  # requeued by the consumer
    service.project_or_park(message())  # acked: parked
    [(event_id, kind, attempts, reason)] = service.store.parked
    assert (event_id, kind, attempts) == ("h-1", "failed", parking.MAX_ATTEMPTS)
    assert reason == "ValueError: integer out of range"


def test_the_brokers_delivery_count_counts_across_restarts():
    service = Service(Store(fail_with=ValueError("x")))
    headers = {"x-delivery-count": parking.MAX_ATTEMPTS - 1}
    service.project_or_park(message(headers=headers))
    assert service.store.parked[0][2] == parking.MAX_ATTEMPTS


@pytest.mark.parametrize(
    "fault",
    [
        sa_exc.OperationalError("SELECT 1", {}, Exception("server closed")),
        sa_exc.InterfaceError("SELECT 1", {}, Exception("connection lost")),
        sa_exc.TimeoutError("pool exhausted"),
    ],
    ids=["operational", "interface", "pool"],
)
def test_a_database_outage_is_retried_without_counting(fault):
    service = Service(Store(fail_with=fault))
    for _ in range(parking.MAX_ATTEMPTS * 2):
        with pytest.raises(type(fault)):
            service.project_or_park(message())
    assert service.store.parked == []
    assert len(service.attempts) == 0


def test_a_body_that_is_no_event_is_parked_at_once():
    service = Service(Store())
    service.project_or_park(message(b"{not json"))
    [(event_id, kind, attempts, reason)] = service.store.parked
    assert (event_id, kind, attempts) == (None, "rejected", 1)
    assert "not JSON" in reason


def test_a_parked_event_is_applied_by_its_replay_once_its_cause_is_gone():
    store = Store(fail_with=ValueError("x"))
    service = Service(store)
    for _ in range(parking.MAX_ATTEMPTS):
        try:
            service.project_or_park(message())
        except ValueError:
            pass
    store.fail_with = None  # the operator fixed the cause

    assert service.replay_parked_event(1) == {
        "id": 1,
        "outcome": "applied",
        "reason": None,
    }
    assert store.applied == ["h-1"]
    with pytest.raises(Conflict):
        service.replay_parked_event(1)  # once
