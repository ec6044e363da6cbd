"""The data-centre gateway against a real RabbitMQ (a fresh vhost per test).

Records posted through the agent API reach ``computenet.usage`` once each,
signed over the exact body; records posted while the relay is stopped are
published by the next relay — nothing is lost. A tenant's voucher hand-over
reaches the voucher's city as ``binding_requested``, through metering.
"""

import json
import uuid
from datetime import timedelta

import pytest
from kombu import Connection, Queue, binding

from services.common import signing
from services.common.amqp import FEDERATION_EXCHANGE, USAGE_EXCHANGE
from services.common.config import DATACENTER_ID, KEY_ID, MAX_BACKLOG
from services.common.db import make_engine
from services.common.migrations import upgrade
from services.common.units import format_ts, utcnow
from services.datacenter_gateway.app import create_app
from services.datacenter_gateway.capacity import CapacityReporter
from services.datacenter_gateway.domain import InventoryItem
from services.datacenter_gateway.outbox import Outbox
from services.datacenter_gateway.relay import Relay, RelayStatus
from services.metering.bindings import BINDINGS_QUEUE
from services.metering.domain.bindings import event_id
from tests.support import metering_data
from tests.support.agent_api import agent_records
from tests.support.bus import consumers, empty
from tests.support.bus import drain as drain_simple
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

DC = "guian-gov-01"
KEY, SECRET = "k1", "integration-secret"
INVENTORY = [InventoryItem("H800", 256)]


def make_records(n):
    return agent_records(n, "it")


@pytest.fixture
def outbox(request, sqlite_url, pg_url_factory):
    url = (
        pg_url_factory("dcgw") if getattr(request, "param", "") == "pg" else sqlite_url
    )
    upgrade("datacenter_gateway", url)
    box = Outbox(make_engine(url), backlog_cache_s=0)
    yield box
    box.close()


@pytest.fixture
def usage_queue(rabbit_uri):
    """A test queue bound to every data centre's usage key."""
    with Connection(rabbit_uri) as conn:
        queue = Queue(
            f"test-usage-{uuid.uuid4().hex[:6]}",
            bindings=[
                binding(USAGE_EXCHANGE, routing_key="*.usage"),
                binding(USAGE_EXCHANGE, routing_key="*.capacity"),
            ],
            durable=False,
        )
        queue(conn.default_channel).declare()
        yield queue


def drain(rabbit_uri, queue, expected, settled, timeout=10.0):
    """Collect messages until ``expected`` arrived and ``settled()`` says
    nothing more will be published (the outbox is empty: the relay marks a row
    only once the broker confirmed it), then the rest already in the queue: a
    record published twice shows here."""
    received = []

    def keep(_body, message):
        received.append(message)
        message.ack()

    def read() -> bool:
        try:
            conn.drain_events(timeout=0.2)
        except TimeoutError:
            return False
        return True

    with Connection(rabbit_uri) as conn:
        with conn.Consumer(queue, callbacks=[keep], accept=None):

            def arrived() -> bool:
                read()
                return len(received) >= expected and settled()

            eventually(
                arrived,
                timeout,
                lambda: (
                    f"{expected} messages, then nothing left to publish; "
                    f"got {len(received)}"
                ),
                interval=0,
            )
            while read():
                pass
    return received


def relayed(outbox):
    """``settled`` of :func:`drain` while a relay runs: its outbox is empty."""
    return lambda: outbox.backlog(fresh=True) == 0


def raw_body(message):
    """The exact bytes, as a raw consumer sees them (services.common.amqp)."""
    body = message.body
    return body.encode() if isinstance(body, str) else bytes(body)


def make_relay(outbox, rabbit_uri, status=None):
    return Relay(outbox, rabbit_uri, DC, KEY, SECRET, batch_size=7, status=status)


@pytest.mark.parametrize("outbox", ["sqlite", "pg"], indirect=True)
def test_every_record_arrives_once_signed_and_nothing_is_lost(
    outbox, rabbit_uri, usage_queue
):
    status = RelayStatus()
    app = create_app(
        {DATACENTER_ID: DC, KEY_ID: KEY, MAX_BACKLOG: 10_000},
        outbox,
        status,
        inventory=INVENTORY,
    )
    client = app.test_client()
    first = make_records(20)
    relay = make_relay(outbox, rabbit_uri, status)
    relay.start()
    try:
        assert client.post("/v1/usage", json=first).status_code == 202
        messages = drain(rabbit_uri, usage_queue, len(first), relayed(outbox))
    finally:
        relay.stop()

    by_id = {}
    for message in messages:
        props, headers = message.properties, message.headers
        assert message.delivery_info["routing_key"] == f"{DC}.usage"
        assert props["content_type"] == "application/json"
        assert props["delivery_mode"] == 2
        assert headers["x-key-id"] == KEY
        assert signing.verify(raw_body(message), SECRET, headers["x-signature"])
        body = json.loads(raw_body(message))
        assert body["datacenter_id"] == DC
        assert props["message_id"] == body["record_id"]
        assert body["record_id"] not in by_id, "published twice"
        by_id[body["record_id"]] = body
    assert set(by_id) == {r["record_id"] for r in first}
    assert client.get("/v1/status").get_json()["published_total"] == len(first)

    # The relay is down: records are still accepted, then published by the next.
    second = make_records(15)
    assert client.post("/v1/usage", json=second).status_code == 202
    assert outbox.backlog(fresh=True) == len(second)
    relay = make_relay(outbox, rabbit_uri)
    relay.start()
    try:
        messages = drain(rabbit_uri, usage_queue, len(second), relayed(outbox))
    finally:
        relay.stop()
    ids = [json.loads(raw_body(m))["record_id"] for m in messages]
    assert sorted(ids) == sorted(r["record_id"] for r in second)
    assert outbox.backlog(fresh=True) == 0


def test_relay_survives_an_unreachable_broker(outbox, rabbit_uri, usage_queue):
    app = create_app({DATACENTER_ID: DC, KEY_ID: KEY}, outbox, inventory=INVENTORY)
    records = make_records(3)
    app.test_client().post("/v1/usage", json=records)
    status = RelayStatus()
    dead = Relay(
        outbox, "amqp://guest:guest@127.0.0.1:1//", DC, KEY, SECRET, status=status
    )
    dead.start()
    try:
        eventually(lambda: status.last_error, 5, "the relay's error")
    finally:
        dead.stop()
    assert status.broker_reachable is False and status.last_error
    assert outbox.backlog(fresh=True) == 3

    relay = make_relay(outbox, rabbit_uri)
    relay.start()
    try:
        messages = drain(rabbit_uri, usage_queue, 3, relayed(outbox))
    finally:
        relay.stop()
    assert len(messages) == 3


def test_unroutable_records_stay_in_the_outbox(outbox, rabbit_uri):
    app = create_app({DATACENTER_ID: DC, KEY_ID: KEY}, outbox, inventory=INVENTORY)
    app.test_client().post("/v1/usage", json=make_records(2))
    relay = make_relay(outbox, rabbit_uri)
    relay._connect()
    try:
        with pytest.raises(Exception, match="unroutable"):
            relay.publish_pending()
    finally:
        relay._disconnect()
    assert outbox.backlog(fresh=True) == 2


def test_capacity_report_is_signed_and_counts_running_jobs(
    outbox, rabbit_uri, usage_queue
):
    now = utcnow()
    running = make_records(1)[0]
    running.update(
        gpu_count=16,
        started_at=format_ts(now - timedelta(minutes=10)),
        ended_at=format_ts(now + timedelta(minutes=3)),
    )
    app = create_app({DATACENTER_ID: DC, KEY_ID: KEY}, outbox, inventory=INVENTORY)
    assert app.test_client().post("/v1/usage", json=[running]).status_code == 202
    reporter = CapacityReporter(outbox, rabbit_uri, DC, KEY, SECRET, INVENTORY)
    reporter.report_once()  # confirmed: nothing more to come
    (message,) = drain(rabbit_uri, usage_queue, 1, lambda: True, timeout=5)
    assert message.delivery_info["routing_key"] == f"{DC}.capacity"
    assert signing.verify(raw_body(message), SECRET, message.headers["x-signature"])
    report = json.loads(raw_body(message))
    assert report["gpus"] == [{"model": "H800", "total": 256, "allocated": 16}]


def test_a_hand_over_reaches_the_vouchers_city_as_binding_requested(metering, outbox):
    """PUT …/voucher → outbox → relay (signed, ``<dc>.binding``) → metering
    (verified) → ``shanghai.binding_requested`` on the bus; DELETE → its
    cancel; a voucher of no admitted city → a dead letter, no event."""
    settings = {DATACENTER_ID: DC, KEY_ID: metering_data.KEY_ID}
    client = create_app(settings, outbox, inventory=INVENTORY).test_client()
    relay = Relay(outbox, metering, DC, metering_data.KEY_ID, metering_data.SECRET)
    with Connection(metering) as connection:
        queue = Queue(
            f"test-binding-requested-{uuid.uuid4().hex[:6]}",
            exchange=FEDERATION_EXCHANGE,
            routing_key="*.binding_requested",
            durable=False,
        )
        queue(connection.default_channel).declare()
        eventually(
            lambda: consumers(connection, BINDINGS_QUEUE.name) >= 1,
            15,
            "metering's binding consumer",
        )
        code = metering_data.voucher("SH")
        asked = client.put("/v1/tenants/acme/voucher", json={"voucher_code": code})
        assert asked.get_json()["status"] == "requested"
        request_id = asked.get_json()["request_id"]
        relay.start()
        try:
            with connection.SimpleQueue(queue) as simple:
                [(routing_key, event)] = drain_simple(simple, lambda got: got)
                assert routing_key == "shanghai.binding_requested"
                assert event == {
                    "event_id": event_id(DC, request_id),
                    "city": "shanghai",
                    "occurred_at": asked.get_json()["requested_at"],
                    "voucher_code": code,
                    "datacenter_id": DC,
                    "tenant_id": "acme",
                    "action": "request",
                    "requested_at": asked.get_json()["requested_at"],
                }

                assert client.delete("/v1/tenants/acme/voucher").status_code == 204
                [(_, cancel)] = drain_simple(simple, lambda got: got)
                assert (cancel["action"], cancel["voucher_code"]) == ("cancel", code)
                assert cancel["event_id"] != event["event_id"]

                unknown = metering_data.voucher("ZZ")
                refused = client.put(
                    "/v1/tenants/beta/voucher", json={"voucher_code": unknown}
                ).get_json()
                [letter] = eventually(
                    lambda: metering_data.dead_letters("unknown_voucher"),
                    15,
                    "the dead letter of a voucher no city issues",
                )
                assert letter["record_id"] == refused["request_id"]
                assert letter["routing_key"] == f"{DC}.binding"
                assert letter["datacenter_id"] == DC
                assert empty(simple) == []
        finally:
            relay.stop()
    assert outbox.pending_bindings(10) == []
