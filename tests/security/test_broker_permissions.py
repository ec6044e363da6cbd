"""The AMQP users the registry creates, against the real RabbitMQ: each city
and data centre can do what its service needs and nothing of another's, and
none can send an RPC request or touch a shared exchange (issue 14)."""

import uuid

import amqp.exceptions
import pytest
from kombu import Connection, Exchange, Producer

from services.city_registry import broker
from services.common.amqp import declare_topology, durable_queue
from services.common.principals import uri_as

pytestmark = pytest.mark.integration

# As members see them: declared by the national side, only checked here.
FED = Exchange("computenet.federation", type="topic", durable=True, passive=True)
RPC = Exchange("nameko-rpc", type="topic", durable=True, passive=True)
USAGE = Exchange("computenet.usage", type="topic", durable=True, passive=True)
DEAD = Exchange("computenet.dead", type="topic", durable=True, passive=True)
SHARED = (FED, RPC, USAGE, DEAD)
REPLY_KEY = str(uuid.uuid4())


@pytest.fixture(autouse=True)
def topology(rabbit_uri):
    """The shared exchanges, as the registry declares them at start."""
    with Connection(rabbit_uri) as connection:
        declare_topology(connection)


@pytest.fixture
def admin(rabbit_uri):
    return broker.BrokerAdmin.from_config({"AMQP_URI": rabbit_uri})


def _try(uri, action):
    with Connection(uri, transport_options={"confirm_publish": True}) as conn:
        action(conn.channel())


def _publish(exchange, key):
    return lambda ch: Producer(ch, exchange=exchange, auto_declare=True).publish(
        b"{}", routing_key=key
    )


def _queue(name, exchange, key):
    return lambda ch: durable_queue(name, exchange, [key])(ch).declare()


def _redeclare(exchange, **changes):
    """Declare a shared exchange for real (not passively), maybe changed."""
    declared = Exchange(
        exchange.name,
        type=changes.get("type", exchange.type),
        durable=True,
        passive=False,
    )
    return lambda ch: declared(ch).declare()


def _delete(exchange):
    return lambda ch: ch.exchange_delete(exchange.name)


def test_a_city_user_is_confined_to_its_own_names(admin, rabbit_uri):
    code = f"c{uuid.uuid4().hex[:6]}"
    user = broker.city_username(code)
    admin.grant(user, "pw", broker.city_permissions(code))
    uri = uri_as(rabbit_uri, user, "pw")
    try:
        _try(uri, _publish(FED, f"{code}.heartbeat"))
        _try(uri, _queue(f"vouchers_{code}.usage_rated", FED, f"{code}.usage_rated"))
        _try(uri, _queue(f"rpc-vouchers_{code}", RPC, f"vouchers_{code}.*"))
        _try(uri, _publish(RPC, REPLY_KEY))
        for refused in (
            # RPC requests to any service, its own included: members serve,
            # they never call (services/common/principals.py).
            _publish(RPC, "city_registry.issue_token"),
            _publish(RPC, "city_registry.datacenter_signing_keys"),
            _publish(RPC, "metering.replay_dead_letter"),
            _publish(RPC, "vouchers_shanghai.revoke_voucher"),
            _publish(RPC, f"vouchers_{code}.get_voucher"),
            _publish(RPC, "reply-to-any-key"),
            # another caller's replies
            _queue(f"vouchers_{code}.spy", RPC, REPLY_KEY),
            # the shared topology
            *(_delete(exchange) for exchange in SHARED),
            *(_redeclare(exchange) for exchange in SHARED),
            _redeclare(FED, type="fanout"),
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


def test_a_datacenter_user_publishes_only_its_own_keys(admin, rabbit_uri):
    """Its usage, capacity and binding requests (CONTRACTS.md §6); nobody
    else's, and nothing else."""
    dc = f"dc-{uuid.uuid4().hex[:6]}"
    user = broker.datacenter_username(dc)
    admin.grant(user, "pw", broker.datacenter_permissions(dc))
    uri = uri_as(rabbit_uri, user, "pw")
    try:
        _try(uri, _publish(USAGE, f"{dc}.usage"))
        _try(uri, _publish(USAGE, f"{dc}.capacity"))
        _try(uri, _publish(USAGE, f"{dc}.binding"))
        for refused in (
            _publish(USAGE, "guian-gov-01.usage"),
            _publish(USAGE, "guian-gov-01.binding"),
            _publish(USAGE, f"{dc}x.binding"),
            _publish(FED, f"{dc}.binding_requested"),
            _publish(FED, "shanghai.binding_requested"),
            _publish(FED, f"{dc}.heartbeat"),
            _publish(RPC, "city_registry.issue_token"),
            _publish(RPC, REPLY_KEY),
            _queue(f"{dc}.spy", USAGE, "#"),
            *(_delete(exchange) for exchange in SHARED),
            *(_redeclare(exchange) for exchange in SHARED),
        ):
            with pytest.raises(amqp.exceptions.AccessRefused):
                _try(uri, refused)
    finally:
        admin.delete_user(user)
    assert not admin.user_exists(user)
