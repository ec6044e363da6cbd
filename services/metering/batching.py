"""Batch consumption and batch publishing for metering's hot path.

nameko's ``@consume`` runs one worker per message, and its ``Publisher`` waits
for the broker's confirm of each event before the next: at thousands of
records a second both cost more than the rating itself. Here:

- :class:`BatchConsumer` (``@consume_batch(queue)``) collects up to
  ``BATCH_SIZE`` deliveries, or what arrived within ``BATCH_WAIT_MS`` of the
  first, and hands them to **one** worker as a list of
  :class:`~services.common.amqp.RawMessage`. Acks are manual: the deliveries
  are acked only after the worker returned (its transaction committed and its
  events confirmed). The worker returns the indices to requeue (messages that
  failed on their own); if it raises, the whole batch is requeued after a
  pause. ``PREFETCH_COUNT`` (default two batches) keeps the next batch
  arriving while one is processed; ``CONSUMERS`` consumers run side by side.
- :class:`ConfirmedPublisher` publishes a list of events and waits for the
  broker's confirms of all of them at once (AMQP ``confirm.select``; acks may
  cover many deliveries at once).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import amqp
import eventlet
from amqp.method_framing import frame_writer
from eventlet.event import Event
from eventlet.queue import LightQueue
from kombu import Connection
from kombu import Consumer as KombuConsumer
from nameko import config
from nameko.extensions import DependencyProvider, Entrypoint

from services.common.amqp import RawMessage
from services.common.config import (
    AMQP_URI,
    BATCH_SIZE,
    BATCH_WAIT_MS,
    CONSUMERS,
    PREFETCH_COUNT,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 200
DEFAULT_BATCH_WAIT_MS = 50
DEFAULT_CONSUMERS = 2
# A consumer that lost the broker (or a batch that failed) waits this long.
RETRY_PAUSE_S = 1.0
CONFIRM_TIMEOUT_S = 30.0
_POLL_S = 0.2


def _raw(message) -> RawMessage:
    body = message.body
    if isinstance(body, str):
        body = body.encode()
    delivery = message.delivery_info or {}
    return RawMessage(
        body=bytes(body),
        headers=dict(message.headers or {}),
        properties=dict(message.properties or {}),
        routing_key=delivery.get("routing_key", ""),
        redelivered=bool(delivery.get("redelivered", False)),
    )


class BatchConsumer(Entrypoint):
    """``@consume_batch(queue)``: the method receives ``list[RawMessage]`` and
    returns the indices of the messages to requeue (or None)."""

    def __init__(self, queue, **kwargs):
        self.queue = queue
        self._stopping = False
        self._threads: list = []
        super().__init__(**kwargs)

    def setup(self):
        self.amqp_uri = config[AMQP_URI]
        self.batch_size = int(config.get(BATCH_SIZE, DEFAULT_BATCH_SIZE))
        self.batch_wait_s = int(config.get(BATCH_WAIT_MS, DEFAULT_BATCH_WAIT_MS)) / 1000
        self.prefetch_count = int(config.get(PREFETCH_COUNT) or 2 * self.batch_size)
        self.consumers = int(config.get(CONSUMERS, DEFAULT_CONSUMERS))

    def start(self):
        self._stopping = False
        self._threads = [
            self.container.spawn_managed_thread(
                self._run, identifier=f"batch_consumer_{n}"
            )
            for n in range(self.consumers)
        ]

    def stop(self):
        # Each consumer finishes (and acks) the batch in hand, then leaves;
        # what it had prefetched goes back to the queue when it disconnects.
        self._stopping = True
        for thread in self._threads:
            thread.wait()
        self._threads = []

    def kill(self):
        self._stopping = True
        for thread in self._threads:
            thread.kill()
        self._threads = []

    # -- one consumer ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._consume()
            except Exception as exc:  # the broker went away: connect again
                if self._stopping:
                    return
                log.warning("batch consumer lost the broker (%r); reconnecting", exc)
                eventlet.sleep(RETRY_PAUSE_S)

    def _consume(self) -> None:
        pending: list = []
        with Connection(self.amqp_uri, heartbeat=0) as connection:
            connection.ensure_connection(max_retries=1)
            channel = connection.channel()
            consumer = KombuConsumer(
                channel,
                queues=[self.queue],
                on_message=pending.append,
                no_ack=False,
                auto_declare=True,
            )
            consumer.qos(prefetch_count=self.prefetch_count)
            with consumer:
                first_at = None
                while not self._stopping:
                    wait = _POLL_S
                    if pending:
                        first_at = first_at or time.monotonic()
                        wait = max(0.0, first_at + self.batch_wait_s - time.monotonic())
                    if len(pending) < self.batch_size and wait > 0:
                        try:
                            connection.drain_events(timeout=wait)
                            continue
                        except TimeoutError:
                            pass
                    if pending:
                        batch = pending[: self.batch_size]
                        del pending[: self.batch_size]
                        first_at = None
                        self._handle(batch)

    def _handle(self, batch: list) -> None:
        done = Event()

        def handle_result(worker_ctx, result, exc_info):
            done.send((result, exc_info))
            return result, exc_info

        self.container.spawn_worker(
            self,
            ([_raw(message) for message in batch],),
            {},
            handle_result=handle_result,
        )
        result, exc_info = done.wait()
        if exc_info is not None:
            log.error(
                "batch of %d failed; requeued",
                len(batch),
                exc_info=exc_info,
            )
            eventlet.sleep(RETRY_PAUSE_S)  # so a fault does not spin
            batch[-1].channel.basic_nack(
                batch[-1].delivery_tag, multiple=True, requeue=True
            )
            return
        requeue = set(result or ())
        if not requeue:
            batch[-1].ack(multiple=True)
            return
        eventlet.sleep(RETRY_PAUSE_S)
        for index, message in enumerate(batch):
            if index in requeue:
                message.requeue()
            else:
                message.ack()


consume_batch = BatchConsumer.decorator


class _Collector:
    """A stand-in transport for py-amqp's frame writer: keeps the frames."""

    def __init__(self, frames: list[bytes]):
        self.frames = frames

    def write(self, view) -> None:
        self.frames.append(bytes(view))  # the writer reuses its buffer


class _ConfirmingChannel:
    """One connection and channel in confirm mode, counting the broker's acks."""

    def __init__(self, amqp_uri: str):
        self.connection = Connection(amqp_uri, heartbeat=0)
        self.connection.ensure_connection(max_retries=1)
        self.channel = self.connection.channel()
        self.channel.confirm_select()
        self.published = 0  # the delivery tag of the last publish
        self.unconfirmed: set[int] = set()
        self.nacked = 0
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        # From here on, frames are collected and sent in one write per batch
        # (py-amqp writes each frame on its own: a system call per event).
        self._frames: list[bytes] = []
        raw = self.connection.connection
        raw.frame_writer = frame_writer(raw, _Collector(self._frames))

    def _flush(self) -> None:
        data = b"".join(self._frames)
        self._frames.clear()
        self.connection.connection.transport.write(data)

    def _confirmed(self, delivery_tag: int, multiple: bool) -> int:
        if multiple:
            done = {tag for tag in self.unconfirmed if tag <= delivery_tag}
        else:
            done = {delivery_tag} & self.unconfirmed
        self.unconfirmed -= done
        return len(done)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._confirmed(delivery_tag, multiple)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self.nacked += self._confirmed(delivery_tag, multiple)

    def publish_all(self, exchange: str, events: Iterable[tuple[str, str, Any]]):
        start = self.published
        for routing_key, message_id, payload in events:
            message = amqp.Message(
                body=json.dumps(payload, separators=(",", ":")).encode(),
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=message_id,
            )
            self.channel.basic_publish(message, exchange, routing_key)
            self.published += 1
            self.unconfirmed.add(self.published)
        if self.published == start:
            return
        self._flush()
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while self.unconfirmed and not self.nacked:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the broker did not confirm the events in time")
            try:
                self.connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        if self.nacked:
            raise ConnectionError("the broker refused (nacked) an event")

    def close(self) -> None:
        try:
            raw = self.connection.connection
            raw.frame_writer = frame_writer(raw, raw.transport)  # write directly
            self.connection.release()
        except Exception:  # noqa: BLE001 - it is being dropped either way
            pass


class ConfirmedPublisher(DependencyProvider):
    """Injects ``publish(events)``: events are ``(routing_key, message_id,
    payload)``; it returns once the broker confirmed every one, or raises."""

    def __init__(self, exchange):
        self.exchange = exchange
        self._idle: LightQueue = LightQueue()

    def setup(self):
        self.amqp_uri = config[AMQP_URI]

    def start(self):
        # Declared once, so a city's queue can bind to it before any event.
        with Connection(self.amqp_uri) as connection:
            self.exchange(connection.default_channel).declare()

    def stop(self):
        while not self._idle.empty():
            self._idle.get_nowait().close()

    kill = stop

    def get_dependency(self, worker_ctx) -> Callable[[Iterable], None]:
        def publish(events: Iterable[tuple[str, str, Any]]) -> None:
            events = list(events)
            if not events:
                return
            try:
                channel = self._idle.get_nowait()
            except eventlet.queue.Empty:
                channel = _ConfirmingChannel(self.amqp_uri)
            try:
                channel.publish_all(self.exchange.name, events)
            except BaseException:
                channel.close()  # its count of confirms is no longer known
                raise
            self._idle.put(channel)

        return publish
