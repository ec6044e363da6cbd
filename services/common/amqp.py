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
from services.common.config import AMQP_URI, QUEUE_DELIVERY_LIMIT, QUEUE_TYPE
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

# Durable queues are *quorum* queues by default (QUEUE_TYPE, docs/cluster.md):
# on a cluster each is replicated to every node and led by one, so a node's
# loss moves the leadership and loses nothing a publisher had confirmed; on
# one node they work the same. A quorum queue keeps every message on disk as
# it arrives, which is what *lazy* did for classic ones (a backlog of hours
# on disk, not a memory alarm blocking every publisher in the country):
# x-queue-mode is no argument of theirs, and RabbitMQ 3.10 refuses it
# (PRECONDITION_FAILED), so it is declared only on classic queues, which
# QUEUE_TYPE: classic keeps (bench_metering: the broker's CPU per record
# 236-290 µs -> 201-220 with lazy; 3.12 and later keep every classic queue
# this way and ignore it).
#
# x-delivery-limit: a quorum queue counts deliveries (x-delivery-count, which
# the registry's parking reads) and dead-letters a message past the limit.
# Our consumers count a message's own failures themselves and park it or
# make it a dead letter after 5 (metering's MAX_DELIVERY_ATTEMPTS, the
# registry's parking), but requeue without counting while a database or the
# registry is down, pausing 1 s each time (metering, the registry): the broker's count
# grows through an outage. So the limit is generous (100 000: more than a
# day of such retries) and the application always decides first; it is set
# explicitly because RabbitMQ 4 gives quorum queues a limit of 20 otherwise.
#
# RabbitMQ refuses to redeclare an existing queue with other arguments (or
# another type): a broker whose queues were declared classic needs them
# drained and deleted first (docs/cluster.md, "Migrating to quorum queues").
QUORUM, CLASSIC = "quorum", "classic"
DEFAULT_QUEUE_TYPE = QUORUM
DEFAULT_DELIVERY_LIMIT = 100_000
LAZY = {"x-queue-mode": "lazy"}
_TYPE_ARGUMENTS = frozenset({"x-queue-type", "x-queue-mode", "x-delivery-limit"})


def queue_type_arguments(
    settings: object = None, dead_letter_queue: bool = False
) -> dict:
    """The arguments of a durable queue's type, from ``settings`` (by default
    nameko's config, read when the queue is declared)."""
    settings = config if settings is None else settings
    kind = (settings.get(QUEUE_TYPE) or DEFAULT_QUEUE_TYPE).lower()
    if kind == CLASSIC:
        return dict(LAZY)
    if kind != QUORUM:
        raise ValueError(f"{QUEUE_TYPE} must be {QUORUM} or {CLASSIC}, not {kind!r}")
    arguments: dict = {"x-queue-type": QUORUM}
    limit = int(settings.get(QUEUE_DELIVERY_LIMIT) or DEFAULT_DELIVERY_LIMIT)
    if limit > 0 and not dead_letter_queue:
        arguments["x-delivery-limit"] = limit
    return arguments


class BusQueue(Queue):
    """A durable queue whose type (:func:`queue_type_arguments`) is read from
    the configuration as it is declared, not when it is built: the queues
    are module constants (``USAGE_QUEUE``), made at import, before a process
    has loaded its configuration."""

    dead_letter_queue = False

    @property
    def queue_arguments(self) -> dict:
        return {
            **self._own_arguments,
            **queue_type_arguments(dead_letter_queue=self.dead_letter_queue),
        }

    @queue_arguments.setter
    def queue_arguments(self, value: dict | None) -> None:
        # kombu sets it as it builds or copies the queue; the type's part is
        # always the configuration's.
        self._own_arguments = {
            key: arg for key, arg in (value or {}).items() if key not in _TYPE_ARGUMENTS
        }


def usage_key(datacenter_id: str) -> str:
    return f"{datacenter_id}.usage"


def capacity_key(datacenter_id: str) -> str:
    return f"{datacenter_id}.capacity"


def binding_key(datacenter_id: str) -> str:
    """A data centre's binding requests (CONTRACTS.md §6, the tenant's voucher)."""
    return f"{datacenter_id}.binding"


def federation_key(city: str, event: str) -> str:
    return f"{city}.{event}"


def durable_queue(name: str, exchange: Exchange, routing_keys: list[str]) -> Queue:
    """A durable, dead-lettered queue (quorum, or classic and lazy, as
    ``QUEUE_TYPE`` says) bound to ``exchange`` by each key."""
    return BusQueue(
        name,
        bindings=[binding(exchange, routing_key=key) for key in routing_keys],
        durable=True,
        queue_arguments=dict(_DEAD_LETTERED),
    )


def city_usage_queue(city: str) -> Queue:
    """``vouchers_<city>.usage_rated``: where metering's usage_rated for the
    city wait, its data centres' binding requests and metering's usage_hold
    (one queue, so that all are read in the order metering sent them: a hold
    after the record it holds). The city consumes it; the registry declares
    it too, at admission and as it starts, so that usage of a city whose
    service has not started yet waits there rather than being returned
    unroutable."""
    return durable_queue(
        f"vouchers_{city}.usage_rated",
        FEDERATION_EXCHANGE,
        [
            federation_key(city, "usage_rated"),
            federation_key(city, "binding_requested"),
            federation_key(city, "usage_hold"),
        ],
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
    """Keeps everything dead-lettered on the bus, for operators to inspect
    (of ``QUEUE_TYPE``, so that it survives a node's loss too; no delivery
    limit: nothing consumes it but an operator)."""
    return _DeadLetterQueue(
        "computenet.dead",
        exchange=DEAD_EXCHANGE,
        routing_key="#",
        durable=True,
    )


class _DeadLetterQueue(BusQueue):
    dead_letter_queue = True  # a class attribute: kombu's copies keep it


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
