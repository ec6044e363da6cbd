"""metering against a real RabbitMQ and PostgreSQL, city_registry replaced.

Signed usage records go in through ``computenet.usage`` exactly as a data
centre's gateway sends them (duplicates, a conflicting duplicate, a forged
signature, a body that is not JSON); ``<city>.usage_rated`` events come out on
``computenet.federation`` once per unique record, and the RPC reads agree.
"""

from datetime import timedelta

import pytest
from kombu import Connection, Queue
from nameko.standalone.rpc import ServiceRpcClient

from services.common.contracts import canonical_json
from services.common.rpc_access import caller_options
from services.common.units import parse_ts, rate_cost_fen, utcnow
from services.metering.domain.encoding import usage_rated_event_id
from services.metering.domain.rollups import CAPACITY_SLICE
from services.metering.service import USAGE_QUEUE
from tests.support.bus import empty, usage_rated_queue, wait_acked
from tests.support.metering_data import (
    DATACENTER_ID,
    KEY_ID,
    PREFIXES,
    PRICE_H800,
    capacity,
    publish_usage,
    signed_headers,
    usage,
    voucher,
)
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

DEADLINE_S = 15


@pytest.fixture
def bus(metering):
    """A kombu connection with a test queue bound to ``*.usage_rated``."""
    with Connection(metering) as connection:
        yield connection, usage_rated_queue(connection, auto_delete=True)


def publish(connection, body: bytes, routing_key: str, headers: dict | None = None):
    publish_usage(
        connection,
        body,
        routing_key=routing_key,
        headers=headers,
        content_encoding="utf-8",
    )


def publish_record(connection, record: dict, **kwargs) -> None:
    publish(connection, canonical_json(record), f"{DATACENTER_ID}.usage", **kwargs)


def collect_events(
    connection, events: Queue, expected_ids: set, received: dict, published: int
):
    """Drain the test queue until every expected event_id was seen, then until
    metering acked all ``published`` messages: every event it was going to
    publish for them is in the queue (it acks after the broker confirmed them),
    so stray extra events show here."""
    with connection.SimpleQueue(events) as simple:
        eventually(
            lambda: expected_ids <= set(_keep(simple, received)),
            DEADLINE_S,
            "an event for every subsidised record",
        )
        wait_acked(connection.as_uri(), USAGE_QUEUE.name, published)
        _keep(simple, received)


def _keep(simple, received: dict) -> dict:
    """Read the test queue until it is empty, keeping every event by its id."""
    for message in empty(simple):
        payload = message.payload
        received.setdefault(payload["event_id"], []).append(
            (message.delivery_info["routing_key"], payload, message.properties)
        )
    return received


def test_usage_is_rated_once_announced_once_and_refusals_kept(bus):
    connection, events = bus
    sh_code, cd_code = voucher("SH"), voucher("CD")
    subsidised = [
        usage(voucher_code=sh_code),
        usage(voucher_code=cd_code, gpu_model="Ascend-910B", gpu_seconds=3601),
        usage(voucher_code=sh_code, gpu_count=1, gpu_seconds=1),
    ]
    plain = [usage(tenant_id="tenant-b"), usage(tenant_id="tenant-b", gpu_seconds=5)]
    for record in subsidised + plain:
        publish_record(connection, record)
    for record in subsidised + plain:  # redelivered by an at-least-once producer
        publish_record(connection, record)
    report = capacity(utcnow().replace(microsecond=0) - timedelta(seconds=60), 64, 8)
    publish(connection, canonical_json(report), f"{DATACENTER_ID}.capacity")

    received: dict = {}
    expected = {
        usage_rated_event_id(DATACENTER_ID, r["record_id"]): r for r in subsidised
    }
    published = 2 * len(subsidised + plain) + 1
    collect_events(connection, events, set(expected), received, published)
    assert set(received) == set(expected)
    for event_id, deliveries in received.items():
        record = expected[event_id]
        # Published again for the redelivered copy: the same fact, same body.
        assert len(deliveries) == 2
        assert len({canonical_json(payload) for _, payload, _ in deliveries}) == 1
        routing_key, payload, properties = deliveries[0]
        city = PREFIXES[record["voucher_code"][:2]]
        assert routing_key == f"{city}.usage_rated"
        assert properties["message_id"] == event_id
        assert payload["record_id"] == record["record_id"]
        assert payload["voucher_code"] == record["voucher_code"]
        assert payload["datacenter"]["government_run"] is True

    # Now the refusals: a changed body under a stored id, a forged signature,
    # a body that is not JSON, a GPU model the data centre does not have.
    conflicting = dict(subsidised[0], gpu_seconds=subsidised[0]["gpu_seconds"] - 1)
    publish_record(connection, conflicting)
    forged = usage()
    publish_record(connection, forged, headers=signed_headers(b"x", KEY_ID, "wrong"))
    publish(connection, b"{not json", f"{DATACENTER_ID}.usage")
    unknown_gpu = usage(gpu_model="B200")
    publish_record(connection, unknown_gpu)

    with ServiceRpcClient("metering", **caller_options()) as metering:
        letters = eventually(
            lambda: (
                len(metering.list_dead_letters(datacenter_id=DATACENTER_ID)) >= 4
                and metering.list_dead_letters(datacenter_id=DATACENTER_ID)
            ),
            DEADLINE_S,
            "the four refusals",
        )
        reasons = {letter["record_id"]: letter["reason"] for letter in letters}
        assert reasons == {
            conflicting["record_id"]: "conflicting_duplicate",
            forged["record_id"]: "bad_signature",
            None: "schema",
            unknown_gpu["record_id"]: "unknown_gpu_model",
        }
        schema_only = metering.list_dead_letters(reason="schema")
        assert [letter["reason"] for letter in schema_only] == ["schema"]

        asked_from = utcnow()
        overview = metering.usage_overview(window_hours=24)
        asked_until = utcnow()
    row = overview["datacenters"][DATACENTER_ID]
    stored = subsidised + plain
    assert row["records_total"] == len(stored)
    assert row["gpu_seconds_total"] == sum(r["gpu_seconds"] for r in stored)
    assert row["gpu_seconds_window"] == row["gpu_seconds_total"]
    price = {"H800": PRICE_H800, "Ascend-910B": 1100}
    assert row["cost_fen_total"] == sum(
        rate_cost_fen(r["gpu_seconds"], price[r["gpu_model"]]) for r in stored
    )
    # The only report began this data centre's coverage: it stands from the
    # start of its hour until the moment metering was asked (at most one slice
    # after the report), whenever that was on a loaded machine.
    reported_at = parse_ts(report["reported_at"])
    since_hour = reported_at.replace(minute=0, second=0)

    def covered(now) -> int:
        until = min(now, reported_at + CAPACITY_SLICE)
        return 64 * int((until - since_hour).total_seconds())

    assert (
        covered(asked_from) - 64
        <= row["capacity_gpu_seconds_window"]
        <= covered(asked_until) + 64
    )
    assert 0 <= row["utilisation_window"] <= 1
    # Nothing more arrived for the refused records, once metering acked them.
    late: dict = {}
    wait_acked(connection.as_uri(), USAGE_QUEUE.name, published + 4)
    with connection.SimpleQueue(events) as simple:
        _keep(simple, late)
    assert set(late) <= set(expected)
