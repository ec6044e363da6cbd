"""Cities' refusals and holds in the registry (SQLite, migrated): stored once
per event id, one row per record with its latest state, listed in pages and
counted per data centre and reason."""

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from services.city_registry.domain.events import REGISTRY_EVENTS, split_routing_key
from services.city_registry.store import RegistryStore
from services.common.contracts import load_event, make_event
from services.common.db import make_engine
from services.common.errors import InvalidRequest, NotFound
from services.common.migrations import upgrade
from services.common.units import utcnow

NOW = utcnow()


@pytest.fixture
def store(sqlite_url):
    upgrade("city_registry", sqlite_url)
    engine = make_engine(sqlite_url)
    with Session(engine, expire_on_commit=False) as session:
        yield RegistryStore(session)
    engine.dispose()


def apply(store, event, eid, city="shanghai", **fields):
    body = load_event(event, make_event(event, city, eid, **fields))
    return store.apply_event(event, body, NOW)


def refuse(store, eid, record_id="r1", dc="dc-a", reason="tenant_not_authorised"):
    return apply(
        store,
        "usage_refused",
        eid,
        record_id=record_id,
        datacenter_id=dc,
        voucher_code="SH-AAAAAAAAAAAA-0",
        reason=reason,
        detail="voucher 'SH-AAAAAAAAAAAA-0'",
    )


def test_the_registry_binds_every_review_event():
    for event in ("usage_refused", "usage_held", "usage_released"):
        assert event in REGISTRY_EVENTS
        assert split_routing_key(f"shanghai.{event}") == ("shanghai", event)
    assert split_routing_key("shanghai.voucher_clawed_back") is not None


def test_a_refusal_is_stored_once_and_listed_by_datacenter(store):
    assert refuse(store, "e1") is True
    assert refuse(store, "e1") is False  # redelivered
    refuse(store, "e2", record_id="r2", dc="dc-b")
    items, total = store.city_refusals("dc-a", None, 10, 0)
    assert total == 1 and items[0]["record_id"] == "r1"
    assert items[0]["reason"] == "tenant_not_authorised"
    assert store.city_refusals(None, None, 10, 0)[1] == 2
    with pytest.raises(InvalidRequest):
        store.city_refusals(None, None, 0, 0)


def test_a_replayed_refusal_learns_what_it_came_to(store):
    refuse(store, "e1")
    [item], _ = store.city_refusals(None, None, 10, 0)
    store.mark_replayed(item["id"], NOW)
    refuse(store, "e1-again", reason="before_authorisation")  # refused again
    found = store.city_refusal(item["id"])
    assert (found["reason"], found["replay_outcome"]) == (
        "before_authorisation",
        "refused",
    )
    store.mark_replayed(item["id"], NOW)
    apply(
        store,
        "usage_released",
        "e3",
        record_id="r1",
        datacenter_id="dc-a",
        voucher_code="SH-AAAAAAAAAAAA-0",
        decision="released",
        subsidy_fen=500,
        actor="replay",
        reason="booked on replay",
    )
    assert store.city_refusal(item["id"])["replay_outcome"] == "booked"
    with pytest.raises(NotFound):
        store.city_refusal(999)


def test_a_hold_and_its_verdict(store):
    apply(
        store,
        "usage_held",
        "h1",
        record_id="r9",
        datacenter_id="dc-a",
        voucher_code="SH-AAAAAAAAAAAA-0",
        reason="double_claim",
        subsidy_fen=800,
        evidence={"records": ["r8"]},
    )
    [held], total = store.city_holds("dc-a", None, "held", 10, 0)
    assert total == 1 and held["evidence"] == {"records": ["r8"]}
    apply(
        store,
        "usage_released",
        "h2",
        record_id="r9",
        datacenter_id="dc-a",
        voucher_code="SH-AAAAAAAAAAAA-0",
        decision="refused",
        subsidy_fen=0,
        actor="city_admin:shanghai",
        reason="idle GPUs",
    )
    [refused], _ = store.city_holds(None, "shanghai", None, 10, 0)
    assert (refused["status"], refused["decided_by"]) == (
        "refused",
        "city_admin:shanghai",
    )
    apply(
        store,
        "voucher_clawed_back",
        "c1",
        voucher_code="SH-AAAAAAAAAAAA-0",
        record_id="r7",
        datacenter_id="dc-a",
        clawed_back_fen=300,
        reason="ghost job",
        actor="national_admin",
    )


def test_counts_by_datacenter_and_reason_since(store):
    refuse(store, "e1")
    refuse(store, "e2", record_id="r2")
    refuse(store, "e3", record_id="r3", dc="dc-b", reason="voucher_expired")
    counts = store.refusal_counts(NOW - timedelta(days=1), None)
    assert {(c["datacenter_id"], c["reason"], c["count"]) for c in counts} == {
        ("dc-a", "tenant_not_authorised", 2),
        ("dc-b", "voucher_expired", 1),
    }
    assert store.refusal_counts(NOW + timedelta(days=1), "dc-a") == []


def hold(store, eid, record_id, city="shanghai", subsidy_fen=800):
    apply(
        store,
        "usage_held",
        eid,
        city=city,
        record_id=record_id,
        datacenter_id="dc-a",
        voucher_code="SH-AAAAAAAAAAAA-0",
        reason="over_capacity",
        subsidy_fen=subsidy_fen,
        evidence={},
    )


def test_review_queues_count_what_still_waits_per_city(store):
    hold(store, "h1", "r1")
    hold(store, "h2", "r2", subsidy_fen=200)
    hold(store, "h3", "r3", city="chengdu", subsidy_fen=50)
    apply(
        store,
        "usage_released",
        "h4",
        record_id="r1",
        datacenter_id="dc-a",
        voucher_code="SH-AAAAAAAAAAAA-0",
        decision="released",
        subsidy_fen=800,
        actor="city_admin:shanghai",
        reason="checked",
    )

    queues = store.review_queues(None)

    assert [(q["city"], q["waiting"], q["subsidy_fen"]) for q in queues] == [
        ("chengdu", 1, 50),
        ("shanghai", 1, 200),  # r1 was decided: it waits no more
    ]
    assert all(q["oldest_held_at"] is not None for q in queues)
    assert [q["city"] for q in store.review_queues("chengdu")] == ["chengdu"]
    assert store.review_queues("shandong") == []
