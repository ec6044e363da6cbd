"""A stored record sent to its city again with ``replay: true`` (the replay
of a city's refusal): the usage_rated it was first published as, with an
event id of its own per replay (SQLite, fake registry)."""

import pytest

from services.common.contracts import load_event
from services.common.errors import Conflict, InvalidRequest, NotFound
from services.metering import ingest
from services.metering.registry import CachedRegistry, RegistryCacheState
from services.metering.replay_rated import replay_rated
from tests.support.metering_data import (
    DATACENTER_ID,
    FakeRegistry,
    raw_message,
    usage,
    voucher,
)


@pytest.fixture
def registry():
    return CachedRegistry(RegistryCacheState(ttl_s=30), FakeRegistry())


def test_a_stored_record_is_sent_again_marked_replay(session, registry):
    record = usage(voucher_code=voucher("SH"))
    [first] = ingest.process_batch(session, registry, [raw_message(record)]).outgoing
    result, [event] = replay_rated(session, DATACENTER_ID, record["record_id"])
    _, [again] = replay_rated(session, DATACENTER_ID, record["record_id"])
    assert result["outcome"] == "sent" and result["event_id"] == event.event_id
    assert event.routing_key == first.routing_key
    assert event.event_id not in (first.event_id, again.event_id)
    body = load_event("usage_rated", event.payload)
    assert body["replay"] is True
    original = load_event("usage_rated", first.payload)
    assert {**body, "event_id": None, "replay": None} == {
        **original,
        "event_id": None,
        "replay": None,
    }


def test_what_cannot_be_replayed(session, registry):
    with pytest.raises(NotFound):
        replay_rated(session, DATACENTER_ID, "no-such-record")
    with pytest.raises(InvalidRequest):
        replay_rated(session, DATACENTER_ID, 42)
    record = usage(voucher_code=None)
    ingest.process_batch(session, registry, [raw_message(record)])
    with pytest.raises(Conflict):
        replay_rated(session, DATACENTER_ID, record["record_id"])
