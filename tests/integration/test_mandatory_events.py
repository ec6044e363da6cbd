"""Events that must arrive are published ``mandatory`` (issue 14, item 2):
an event no queue is bound for is an error its publisher handles, never
confirmed by the broker and dropped.

Against the real RabbitMQ: the hand-framed confirmed channel raises
``Unroutable`` and stays usable; metering keeps a record whose usage_rated
no city queue takes as a dead letter after its bounded attempts (the record
itself stored once), while the cities whose queues exist get theirs.
"""

from __future__ import annotations

import nameko
import pytest
from kombu import Connection, Queue
from nameko.standalone.rpc import ServiceRpcClient

from services.common import batching
from services.common.amqp import (
    FEDERATION_EXCHANGE,
    city_usage_queue,
    declare_topology,
)
from services.common.config import DATABASE_URL, REGISTRY_CACHE_TTL_S
from services.common.contracts import canonical_json
from services.common.publishing import ConfirmingChannel, Unroutable
from services.common.rpc_access import caller_options
from services.metering.service import MeteringService
from tests.support import bus, management
from tests.support.metering_data import (
    parked_events,
    publish_usage,
    usage,
    voucher,
)
from tests.support.polling import eventually

pytestmark = pytest.mark.integration


def test_an_unroutable_event_raises_and_the_channel_goes_on(rabbit_uri):
    with Connection(rabbit_uri) as connection:
        declare_topology(connection)
        Queue("test.bound", exchange=FEDERATION_EXCHANGE, routing_key="a.usage_rated")(
            connection.default_channel
        ).declare()
    channel = ConfirmingChannel(rabbit_uri, mandatory=True)
    try:
        channel.publish_all(FEDERATION_EXCHANGE.name, [("a.usage_rated", "e1", {})])
        with pytest.raises(Unroutable) as raised:
            channel.publish_all(
                FEDERATION_EXCHANGE.name,
                [("a.usage_rated", "e2", {}), ("nobody.usage_rated", "e3", {})],
            )
        assert raised.value.routing_keys == ["nobody.usage_rated"]
        channel.publish_all(FEDERATION_EXCHANGE.name, [("a.usage_rated", "e4", {})])
    finally:
        channel.close()
    with Connection(rabbit_uri) as connection:
        assert bus.ready(connection, "test.bound") == 3  # e1, e2, e4


def test_without_mandatory_the_broker_drops_it_silently(rabbit_uri):
    """What the flag is for: the same publish, not mandatory, is confirmed."""
    with Connection(rabbit_uri) as connection:
        declare_topology(connection)
    channel = ConfirmingChannel(rabbit_uri)
    try:
        channel.publish_all(
            FEDERATION_EXCHANGE.name, [("nobody.usage_rated", "e1", {})]
        )
    finally:
        channel.close()


def test_usage_no_city_queue_takes_ends_parked_once_stored(
    registry_stand_in, metering_db, container_factory, monkeypatch
):
    monkeypatch.setattr(batching, "RETRY_PAUSE_S", 0.05)
    vhost = management.vhost_of(registry_stand_in)
    # The stand-in declared both cities' queues, as the registry does; Chengdu's
    # is gone (deleted by an operator, say).
    management.delete("queues", vhost, "vouchers_chengdu.usage_rated")
    config = {
        DATABASE_URL: metering_db,
        REGISTRY_CACHE_TTL_S: 30,
        "MAX_DELIVERY_ATTEMPTS": 3,
        "BATCH_WAIT_MS": 200,
    }
    lost = usage(record_id="to-chengdu", voucher_code=voucher("CD"))
    kept = [
        usage(record_id=f"to-shanghai-{n}", voucher_code=voucher("SH"))
        for n in range(3)
    ]
    with nameko.config.patch(config):
        container_factory(MeteringService).start()
        with Connection(registry_stand_in) as connection:
            for record in [kept[0], lost, *kept[1:]]:
                publish_usage(connection, canonical_json(record))

            [parked] = eventually(parked_events, 60, "the unroutable record parked")
            assert parked["routing_key"].endswith(".usage")
            assert parked["kind"] == "failed" and parked["attempts"] == 3
            assert "Unroutable" in parked["reason"]
            assert "chengdu.usage_rated" in parked["reason"]
            assert eventually(
                lambda: bus.ready(connection, "vouchers_shanghai.usage_rated") == 3,
                30,
                "Shanghai's three usage_rated",
            )
            assert eventually(
                lambda: bus.ready(connection, "metering.usage") == 0, 30, "drained"
            )
        # The queue back (the registry's timer declares it again): a replay of
        # the parked message announces the stored record (a duplicate: it
        # was stored, only its event was lost).
        with Connection(registry_stand_in) as connection:
            city_usage_queue("chengdu")(connection.default_channel).declare()
            with ServiceRpcClient("metering", **caller_options()) as rpc:
                replayed = rpc.replay_parked_event(parked["id"])
                assert replayed["outcome"] == "duplicate", replayed
            assert bus.ready(connection, "vouchers_chengdu.usage_rated") == 1
