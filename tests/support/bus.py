"""What the tests read from RabbitMQ: how many messages wait in a queue, how
many a queue's consumers acknowledged, and a test queue drained.

``acked`` is the positive signal a "nothing else happens" check waits for:
once a queue's consumers acknowledged every message the test published to it,
everything they were going to do about those messages is done (the services
ack after their commit and their confirmed publishes). The management API
samples its counts every few seconds, so a wait on it takes up to that long;
a stale sample only ever reads low.
"""

from __future__ import annotations

from typing import Any

from kombu import Queue

from services.common.amqp import FEDERATION_EXCHANGE, durable_queue
from tests.support import management
from tests.support.polling import eventually


def usage_rated_queue(connection, **options: Any) -> Queue:
    """``test.usage_rated``, declared: a test queue seeing every city's
    ``usage_rated`` events on ``computenet.federation``."""
    queue = Queue(
        "test.usage_rated",
        exchange=FEDERATION_EXCHANGE,
        routing_key="*.usage_rated",
        **options,
    )
    queue(connection.default_channel).declare()
    return queue


def registry_queue(connection) -> Queue:
    """The registry's federation queue, declared as the registry declares it:
    what a city's events (published ``mandatory``) reach when no registry
    runs in the test."""
    from services.city_registry.domain.events import ROUTING_KEYS
    from services.city_registry.service import FEDERATION_QUEUE

    queue = durable_queue(FEDERATION_QUEUE, FEDERATION_EXCHANGE, ROUTING_KEYS)
    queue(connection.default_channel).declare()
    return queue


def declared(connection, queue: str) -> Any | None:
    """``queue_declare(passive=True)``'s answer (``message_count`` ready,
    ``consumer_count``), or None while nobody has declared the queue."""
    channel = connection.channel()
    try:
        return channel.queue_declare(queue, passive=True)
    except Exception:  # noqa: BLE001 - not declared yet (the channel is closed)
        return None
    finally:
        try:
            channel.close()
        except Exception:  # noqa: BLE001 - a failed declare closed it
            pass


def ready(connection, queue: str) -> int | None:
    """The messages waiting in ``queue`` (not those delivered and unacked)."""
    answer = declared(connection, queue)
    return None if answer is None else answer.message_count


def consumers(connection, queue: str) -> int:
    """The consumers on ``queue``; 0 while it is not declared."""
    answer = declared(connection, queue)
    return 0 if answer is None else answer.consumer_count


def acked(rabbit_uri: str, queue: str) -> int:
    """How many deliveries from ``queue`` its consumers acknowledged so far."""
    info = management.get("queues", management.vhost_of(rabbit_uri), queue)
    return info.get("message_stats", {}).get("ack", 0)


def wait_acked(rabbit_uri: str, queue: str, count: int, timeout: float = 30) -> int:
    """Wait until ``queue``'s consumers acknowledged ``count`` deliveries."""
    return eventually(
        lambda: acked(rabbit_uri, queue) >= count and acked(rabbit_uri, queue),
        timeout,
        f"{count} acknowledgements on {queue}",
        interval=0.5,
    )


def drain(simple, until, timeout: float = 15.0) -> list[tuple[str, Any]]:
    """Collect ``(routing_key, payload)`` from a kombu ``SimpleQueue`` until
    ``until(messages)`` holds."""
    messages: list[tuple[str, Any]] = []

    def done() -> bool:
        if until(messages):
            return True
        try:
            message = simple.get(block=True, timeout=0.5)
        except simple.Empty:
            return False
        messages.append((message.delivery_info["routing_key"], message.payload))
        message.ack()
        return until(messages)

    eventually(
        done,
        timeout,
        lambda: f"the messages; got {[m[0] for m in messages]}",
        interval=0,
    )
    return messages


def empty(simple) -> list[Any]:
    """Every message in a kombu ``SimpleQueue`` now, acked (read until empty)."""
    messages = []
    while True:
        try:
            message = simple.get(block=False)
        except simple.Empty:
            return messages
        message.ack()
        messages.append(message)
