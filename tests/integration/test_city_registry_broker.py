"""The AMQP users the registry creates, against the real RabbitMQ: each city
and data centre can do what its service needs and nothing of another's."""

import uuid
from urllib.parse import urlsplit

import amqp.exceptions
import pytest
from kombu import Connection, Exchange, Producer

from services.city_registry import broker
from services.common.amqp import durable_queue

pytestmark = pytest.mark.integration

FED = Exchange("computenet.federation", type="topic", durable=True)
RPC = Exchange("nameko-rpc", type="topic", durable=True)
USAGE = Exchange("computenet.usage", type="topic", durable=True)


@pytest.fixture
def admin(rabbit_uri):
    return broker.BrokerAdmin.from_config({"AMQP_URI": rabbit_uri})


def _uri(rabbit_uri, user, password):
    parts = urlsplit(rabbit_uri)
    return f"amqp://{user}:{password}@{parts.hostname}:{parts.port}{parts.path}"


def _try(uri, action):
    with Connection(uri, transport_options={"confirm_publish": True}) as conn:
        action(conn.channel())


def _publish(exchange, key):
    return lambda ch: Producer(ch, exchange=exchange, auto_declare=True).publish(
        b"{}", routing_key=key
    )


def _queue(name, exchange, key):
    return lambda ch: durable_queue(name, exchange, [key])(ch).declare()


def test_a_city_user_is_confined_to_its_own_names(admin, rabbit_uri):
    code = f"c{uuid.uuid4().hex[:6]}"
    user = broker.city_username(code)
    admin.grant(user, "pw", broker.city_permissions(code))
    uri = _uri(rabbit_uri, user, "pw")
    try:
        _try(uri, _publish(FED, f"{code}.heartbeat"))
        _try(uri, _queue(f"vouchers_{code}.usage_rated", FED, f"{code}.usage_rated"))
        _try(uri, _queue(f"rpc-vouchers_{code}", RPC, f"vouchers_{code}.*"))
        _try(uri, _publish(RPC, "reply-to-any-caller"))
        for refused in (
            _publish(FED, "shanghai.voucher_issued"),
            _queue(f"vouchers_{code}.usage_rated", FED, "shanghai.usage_rated"),
            _queue("vouchers_shanghai.usage_rated", FED, "shanghai.usage_rated"),
            _queue(f"rpc-vouchers_{code}", RPC, "city_registry.*"),
            _publish(USAGE, "dc.usage"),
        ):
            with pytest.raises(amqp.exceptions.AccessRefused):
                _try(uri, refused)
    finally:
        admin.delete_user(user)
    with pytest.raises(amqp.exceptions.AccessRefused):
        _try(uri, _publish(FED, f"{code}.heartbeat"))


def test_a_datacenter_user_publishes_only_its_own_usage(admin, rabbit_uri):
    dc = f"dc-{uuid.uuid4().hex[:6]}"
    user = broker.datacenter_username(dc)
    admin.grant(user, "pw", broker.datacenter_permissions(dc))
    uri = _uri(rabbit_uri, user, "pw")
    try:
        _try(uri, _publish(USAGE, f"{dc}.usage"))
        with pytest.raises(amqp.exceptions.AccessRefused):
            _try(uri, _publish(USAGE, "guian-gov-01.usage"))
        with pytest.raises(amqp.exceptions.AccessRefused):
            _try(uri, _publish(FED, f"{dc}.heartbeat"))
    finally:
        admin.delete_user(user)
    assert not admin.user_exists(user)
