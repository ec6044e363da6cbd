"""A data centre's binding requests (``<id>.binding``, CONTRACTS.md §6), against
the real RabbitMQ, metering and PostgreSQL: asking in its own name reaches
the voucher's city; asking in another's — under its routing key, its key id,
or its ``datacenter_id`` — is refused by the broker or kept by metering as a
dead letter, and no city hears of it (DESIGN.md §8, §9 consent)."""

import secrets
import uuid
from datetime import timedelta

import amqp.exceptions
import pytest
from kombu import Connection, Exchange, Producer, Queue

from services.city_registry import broker
from services.common.amqp import FEDERATION_EXCHANGE
from services.common.principals import uri_as
from services.common.units import utcnow
from services.datacenter_gateway import domain as gateway
from services.metering.bindings import BINDINGS_QUEUE
from tests.support import metering_data
from tests.support.bus import consumers, empty
from tests.support.bus import drain as drain_simple
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

DC = metering_data.DATACENTER_ID
USAGE = Exchange("computenet.usage", type="topic", durable=True, passive=True)


@pytest.fixture
def bus(metering, rabbit_uri):
    """``(the data centre's own broker URI, a test queue of every city's
    binding_requested)``, metering's binding consumer running."""
    admin = broker.BrokerAdmin.from_config({"AMQP_URI": rabbit_uri})
    user, password = broker.datacenter_username(DC), secrets.token_hex(8)
    admin.grant(user, password, broker.datacenter_permissions(DC))
    with Connection(rabbit_uri) as connection:
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
        with connection.SimpleQueue(queue) as simple:
            yield uri_as(rabbit_uri, user, password), simple
    admin.delete_user(user)


def request(datacenter_id: str = DC) -> gateway.BindingRequest:
    at = utcnow() - timedelta(seconds=2)
    code = metering_data.voucher("SH")
    return gateway.binding_request(datacenter_id, "acme", code, "request", at)


def ask(uri, body: bytes, routing_key: str = f"{DC}.binding", key=None):
    """Publish ``body`` as the data centre's gateway does, signed with
    ``key`` (key id, secret): its own by default."""
    key_id, secret = key or (metering_data.KEY_ID, metering_data.SECRET)
    with Connection(uri, transport_options={"confirm_publish": True}) as conn:
        Producer(conn.channel(), exchange=USAGE, auto_declare=True).publish(
            body,
            routing_key=routing_key,
            content_type="application/json",
            delivery_mode=2,
            headers=gateway.message_headers(body, key_id, secret),
            user_id=broker.datacenter_username(DC),
        )


def test_a_data_centre_asks_only_in_its_own_name(bus):
    uri, simple = bus
    own = request()
    ask(uri, own.body)
    [(routing_key, event)] = drain_simple(simple, lambda got: got)
    assert routing_key == "shanghai.binding_requested"
    assert (event["datacenter_id"], event["voucher_code"]) == (DC, own.voucher_code)

    # Under another data centre's routing key: the broker refuses it.
    with pytest.raises(amqp.exceptions.AccessRefused):
        ask(uri, request("zhongwei-gov-01").body, "zhongwei-gov-01.binding")

    # Signed with another data centre's key, or its own key id with another
    # secret; or naming another data centre in the body: dead letters.
    ask(uri, request().body, key=("zhongwei-gov-01-k1", "its-secret"))
    ask(uri, request().body, key=(metering_data.KEY_ID, "guessed"))
    ask(uri, request("zhongwei-gov-01").body)
    letters = eventually(
        lambda: len(found := metering_data.dead_letters()) >= 3 and found,
        15,
        "three dead letters",
    )
    reasons = sorted(letter["reason"] for letter in letters)
    assert reasons == ["bad_signature", "bad_signature", "datacenter_mismatch"]
    assert {letter["routing_key"] for letter in letters} == {f"{DC}.binding"}
    assert empty(simple) == []  # no city heard of any of them
