"""Members reach the broker over TLS (amqps), on a node that has no plain
AMQP listener at all (``tests/support/tls_broker.py``):

- a data centre's relay publishes signed usage records with confirms, and its
  capacity reporter a report;
- a city's voucher service consumes a ``usage_rated`` batch, read from its
  frames by hand (over TLS py-amqp reads the socket: no read-ahead), and
  publishes its events on the batching path, with confirms.

Every connection the node lists for the test's vhost is TLS.
"""

import json
from functools import partial
from types import SimpleNamespace

import nameko
import pytest
from kombu import Connection, Queue, binding
from kombu.simple import SimpleQueue

from services.common import batching, signing
from services.common.amqp import FEDERATION_EXCHANGE, USAGE_EXCHANGE
from services.common.config import (
    AMQP_SSL,
    AMQP_URI,
    CITY_CODE,
    DATABASE_URL,
    DATACENTER_ID,
    HEARTBEAT_INTERVAL_S,
    KEY_ID,
    MAX_BACKLOG,
    RULES_FILE,
)
from services.common.db import make_engine
from services.common.migrations import upgrade
from services.common.rpc import RpcPool
from services.datacenter_gateway.app import create_app
from services.datacenter_gateway.capacity import CapacityReporter
from services.datacenter_gateway.domain import InventoryItem
from services.datacenter_gateway.outbox import Outbox
from services.datacenter_gateway.relay import Relay, RelayStatus
from services.vouchers.service import build
from tests.support.agent_api import agent_records
from tests.support.bus import drain
from tests.support.polling import eventually
from tests.support.vouchers_books import consent_by_rpc
from tests.support.vouchers_data import EAST_COMMERCIAL as COMMERCIAL
from tests.support.vouchers_data import (
    SHANGHAI_RULES,
    application,
    publish_usage_rated,
    rated,
)

pytestmark = pytest.mark.integration

DC = "guian-gov-01"
KEY, SECRET = "k1", "tls-secret"
CITY = "shanghai"
RULES = SHANGHAI_RULES


def _vhost(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


def assert_only_tls(tls_broker, uri: str, at_least: int) -> None:
    """The node's connections to the test's vhost: ``at_least`` of them, all
    TLS; and the node listens for nothing but AMQP over TLS."""
    listeners = tls_broker.ctl(
        "eval", "[element(3, L) || L <- rabbit_networking:active_listeners()]."
    )
    protocols = {p.strip(" '\n") for p in listeners.strip().strip("[]").split(",")}
    assert "amqp/ssl" in protocols and "amqp" not in protocols, protocols
    connections = tls_broker.connections(_vhost(uri))
    assert len(connections) >= at_least, connections
    assert {c["ssl"] for c in connections} == {"true"}, connections


def make_records(n):
    return agent_records(n, "tls")


def test_a_data_centre_publishes_signed_usage_over_tls_with_confirms(
    tls_broker, tls_vhost, sqlite_url
):
    uri, tls = tls_vhost
    upgrade("datacenter_gateway", sqlite_url)
    outbox = Outbox(make_engine(sqlite_url), backlog_cache_s=0)
    status = RelayStatus()
    app = create_app(
        {DATACENTER_ID: DC, KEY_ID: KEY, MAX_BACKLOG: 10_000},
        outbox,
        status,
        inventory=[InventoryItem("H800", 256)],
    )
    records = make_records(20)
    received = []
    with Connection(uri, ssl=tls) as conn:
        queue = Queue(
            "test-usage",
            bindings=[
                binding(USAGE_EXCHANGE, routing_key="*.usage"),
                binding(USAGE_EXCHANGE, routing_key="*.capacity"),
            ],
        )
        queue(conn.default_channel).declare()
        relay = Relay(
            outbox, uri, DC, KEY, SECRET, batch_size=7, status=status, ssl=tls
        )
        relay.start()
        try:
            assert app.test_client().post("/v1/usage", json=records).status_code == 202
            assert eventually(
                lambda: outbox.backlog(fresh=True) == 0, 15, "the outbox relayed"
            )
            assert_only_tls(tls_broker, uri, at_least=2)  # the relay's and ours
        finally:
            relay.stop()
        CapacityReporter(
            outbox, uri, DC, KEY, SECRET, [InventoryItem("H800", 256)], ssl=tls
        ).report_once()

        def keep(_body, message):
            received.append(message)
            message.ack()

        def arrived() -> bool:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
            return len(received) > len(records)

        with conn.Consumer(queue, callbacks=[keep], accept=None):
            eventually(
                arrived,
                15,
                lambda: f"{len(records) + 1} messages; got {len(received)}",
                interval=0,
            )
    assert status.published_total == len(records)
    by_key = {}
    for message in received:
        body = message.body
        body = body.encode() if isinstance(body, str) else bytes(body)
        assert signing.verify(body, SECRET, message.headers["x-signature"])
        by_key.setdefault(message.delivery_info["routing_key"], []).append(body)
    usage = {json.loads(body)["record_id"] for body in by_key[f"{DC}.usage"]}
    assert usage == {r["record_id"] for r in records}
    assert len(by_key[f"{DC}.capacity"]) == 1
    outbox.close()


def test_a_city_books_a_batch_and_publishes_its_events_over_tls(
    tls_broker, tls_vhost, vouchers_db, tmp_path, container_factory, monkeypatch
):
    uri, tls = tls_vhost
    rules = tmp_path / "shanghai.yaml"
    rules.write_text(RULES)
    config = {
        AMQP_URI: uri,
        AMQP_SSL: tls,
        DATABASE_URL: vouchers_db,
        CITY_CODE: CITY,
        RULES_FILE: str(rules),
        HEARTBEAT_INTERVAL_S: 5,
    }
    by_py_amqp = []  # deliveries the hand reader left to py-amqp
    real_as_delivery = batching.as_delivery
    read_ahead = []  # whether each consumer's connection reads the socket ahead
    real_buffer_reads = batching.buffer_reads

    def as_delivery(message):
        by_py_amqp.append(message)
        return real_as_delivery(message)

    def buffer_reads(connection):
        read_ahead.append(real_buffer_reads(connection))
        return read_ahead[-1]

    monkeypatch.setattr(batching, "as_delivery", as_delivery)
    monkeypatch.setattr(batching, "buffer_reads", buffer_reads)

    with Connection(uri, ssl=tls) as connection:
        federation = Queue(
            "test.federation",
            bindings=[binding(FEDERATION_EXCHANGE, routing_key="shanghai.#")],
        )
        federation(connection.channel()).declare()
        simple = SimpleQueue(connection, federation)
        with nameko.config.patch(config):
            service_cls = build(dict(nameko.config))
        container_factory(service_cls, config).start()
        pool = RpcPool(uri, size=1, timeout=15, ssl=tls)
        try:
            code = pool.call(f"vouchers_{CITY}", "apply", application())["voucher"][
                "code"
            ]
            # its holder authorises the test data's tenants (DESIGN.md §9)
            city = SimpleNamespace(
                authorise_binding=partial(
                    pool.call, f"vouchers_{CITY}", "authorise_binding"
                )
            )
            consent_by_rpc(city, vouchers_db, code)
        finally:
            pool.close()
        count = 30
        publish_usage_rated(
            connection,
            *(rated(code, f"tls-{n}", 1_000, COMMERCIAL) for n in range(count)),
        )
        messages = drain(
            simple,
            lambda m: len(_events(m, "voucher_redeemed")) >= count,
            timeout=30,
        )
        assert_only_tls(tls_broker, uri, at_least=3)
        simple.close()
    redeemed = _events(messages, "voucher_redeemed")
    assert sorted(b["record_id"] for b in redeemed) == sorted(
        f"tls-{n}" for n in range(count)
    )
    assert all(b["subsidy_fen"] == 800 for b in redeemed)
    assert read_ahead and not any(read_ahead), "no read-ahead on a TLS socket"
    assert not by_py_amqp, "every delivery read from its frames by hand"


def _events(messages, event):
    return [body for key, body in messages if key == f"{CITY}.{event}"]
