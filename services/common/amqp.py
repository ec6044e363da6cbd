"""The bus: exchanges, routing keys and queue declarations (DESIGN.md §3).

Every process declares what it uses through these helpers, so that names,
durability and dead-lettering are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import nameko.rpc
from kombu import Connection, Exchange, Queue, binding
from nameko import config
from nameko.amqp.consume import Consumer as ConsumerCore
from nameko.extensions import DependencyProvider
from nameko.messaging import Consumer

from services.common.broker_tls import broker_ssl
from services.common.config import AMQP_URI
from services.common.principals import (
    NATIONAL,
    national_users,
    principal_of,
    username_of,
)

USAGE_EXCHANGE = Exchange("computenet.usage", type="topic", durable=True)
FEDERATION_EXCHANGE = Exchange("computenet.federation", type="topic", durable=True)
DEAD_EXCHANGE = Exchange("computenet.dead", type="topic", durable=True)

# Messages a consumer rejects (not the ones it refuses for a reason it stores
# itself) go to computenet.dead, keeping their routing key.
_DEAD_LETTERED = {"x-dead-letter-exchange": DEAD_EXCHANGE.name}

# Durable queues are *lazy*: their messages go to disk as they arrive instead
# of being held in the broker's memory as well. A consumer that is down for
# hours (metering during an outage: up to 10^7 records a day nationally; a
# city's voucher service) then leaves a backlog on disk, not a memory alarm
# that would block every publisher in the country; and the broker does less
# for each message (bench_metering: its CPU per record 236-290 µs -> 201-220,
# the usage_rated queue's work a fifth less). RabbitMQ 3.12 and later keep
# every classic queue this way and ignore the argument. RabbitMQ refuses to
# redeclare an existing queue with other arguments: a broker whose queues
# were declared without it needs them drained and deleted first
# (docs/ARCHITECTURE.md, "The bus").
LAZY = {"x-queue-mode": "lazy"}


def usage_key(datacenter_id: str) -> str:
    return f"{datacenter_id}.usage"


def capacity_key(datacenter_id: str) -> str:
    return f"{datacenter_id}.capacity"


def federation_key(city: str, event: str) -> str:
    return f"{city}.{event}"


def durable_queue(name: str, exchange: Exchange, routing_keys: list[str]) -> Queue:
    """A durable, lazy, dead-lettered queue bound to ``exchange`` by each key."""
    return Queue(
        name,
        bindings=[binding(exchange, routing_key=key) for key in routing_keys],
        durable=True,
        queue_arguments={**_DEAD_LETTERED, **LAZY},
    )


def city_usage_queue(city: str) -> Queue:
    """``vouchers_<city>.usage_rated``: where metering's usage_rated for the
    city wait. The city consumes it; the registry declares it too, at
    admission and as it starts, so that usage of a city whose service has not
    started yet waits there rather than being returned unroutable."""
    return durable_queue(
        f"vouchers_{city}.usage_rated",
        FEDERATION_EXCHANGE,
        [federation_key(city, "usage_rated")],
    )


def shared_exchanges() -> list[Exchange]:
    """The exchanges every member uses and only the national side declares."""
    return [
        USAGE_EXCHANGE,
        FEDERATION_EXCHANGE,
        DEAD_EXCHANGE,
        nameko.rpc.get_rpc_exchange(),
    ]


def is_member(amqp_uri: str, national: object = None) -> bool:
    """Whether ``amqp_uri`` connects as a member (a city, a data centre …),
    not as the national side (``NATIONAL_BROKER_USERS``, ``national.*``)."""
    principal = principal_of(username_of(amqp_uri), national_users(national))
    return principal is None or principal.kind != NATIONAL


def declare_shared_passively() -> None:
    """In a member's process: the shared exchanges are checked, never declared.

    A member's broker user has no configure permission on them (it could
    delete them, or redeclare them with another type), so declaring them
    would be refused; a passive declare only asks that they exist, which the
    national side made sure of (:class:`SharedTopology`). Called once at
    process start, before any connection."""
    for exchange in (USAGE_EXCHANGE, FEDERATION_EXCHANGE, DEAD_EXCHANGE):
        exchange.passive = True
    rpc_exchange = nameko.rpc.get_rpc_exchange()
    rpc_exchange.passive = True
    # nameko builds its RPC exchange anew at each use, from this function.
    nameko.rpc.get_rpc_exchange = lambda: rpc_exchange


def declare_topology(connection: Connection) -> None:
    """Declare the shared exchanges and the dead-letter queue (national side)."""
    channel = connection.default_channel
    for exchange in shared_exchanges():
        exchange(channel).declare()
    dead_letter_queue()(channel).declare()


class SharedTopology(DependencyProvider):
    """The national registry declares the shared topology as it starts, so
    that members, which may only check it, find it there; and each city's
    usage queue (:func:`city_usage_queue`), injected as
    ``declare_city_queues(codes)``; ``cities`` are declared at setup too."""

    def __init__(self, cities: tuple[str, ...] = ()) -> None:
        self.cities = tuple(cities)

    def setup(self) -> None:
        with self._connection() as connection:
            declare_topology(connection)
        if self.cities:
            self.declare_city_queues(self.cities)

    def _connection(self) -> Connection:
        return Connection(config[AMQP_URI], ssl=broker_ssl(config))

    def declare_city_queues(self, cities) -> None:
        with self._connection() as connection:
            channel = connection.default_channel
            for city in cities:
                city_usage_queue(city)(channel).declare()

    def get_dependency(self, worker_ctx):
        return self.declare_city_queues


def dead_letter_queue() -> Queue:
    """Keeps everything dead-lettered on the bus, for operators to inspect."""
    return Queue(
        "computenet.dead",
        exchange=DEAD_EXCHANGE,
        routing_key="#",
        durable=True,
    )


@dataclass(frozen=True)
class RawMessage:
    """An AMQP message as received: exact body bytes, headers and properties.

    Signature checks need the body exactly as signed, and a body that is not
    JSON must still reach the handler (to become a dead letter with a reason),
    so raw consumers skip kombu's decoding.
    """

    body: bytes
    headers: dict
    properties: dict
    routing_key: str
    redelivered: bool

    @property
    def content_type(self) -> str | None:
        return self.properties.get("content_type")

    @property
    def message_id(self) -> str | None:
        return self.properties.get("message_id")


class _RawConsumerCore(ConsumerCore):
    def get_consumers(self, consumer_cls, channel):
        consumer = consumer_cls(
            queues=self.queues,
            on_message=lambda message: self.on_message(None, message),
            accept=self.accept,
            **self.consumer_options,
        )
        consumer.qos(prefetch_count=self.prefetch_count)
        return [consumer]


class RawConsumer(Consumer):
    """``@consume_raw(queue)``: the handler receives a :class:`RawMessage`.

    The message is acked when the worker returns; if the worker raises, it is
    requeued when ``requeue_on_error`` is set (a transient fault such as the
    database being down), so nothing is lost.
    """

    consumer_cls = _RawConsumerCore

    def handle_message(self, body, message):
        raw = message.body
        if isinstance(raw, str):
            raw = raw.encode()
        delivery = message.delivery_info or {}
        wrapped = RawMessage(
            body=bytes(raw),
            headers=dict(message.headers or {}),
            properties=dict(message.properties or {}),
            routing_key=delivery.get("routing_key", ""),
            redelivered=bool(delivery.get("redelivered", False)),
        )
        super().handle_message(wrapped, message)


consume_raw = RawConsumer.decorator
