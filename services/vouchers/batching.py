"""Batch consumption of ``usage_rated`` and confirmed batch publishing.

nameko's ``@consume`` runs one worker (one transaction, one confirmed publish)
per message; at thousands of records a second the per-message round trips cost
far more than the booking itself. Here:

- :class:`BatchConsumer` (``@consume_batch(queue)``) collects up to
  ``BATCH_SIZE`` deliveries, or what arrived within ``BATCH_WAIT_MS`` of the
  first, and hands them to **one** worker as a list of
  :class:`~services.common.amqp.RawMessage`. Acks are manual and come last:
  the deliveries are acked only after the worker returned (its transaction
  committed) and the broker confirmed the events it published. If either
  fails, the batch is requeued after a pause (redelivered records find their
  bookings and publish the same events again).
- :class:`ConfirmedPublisher` publishes a list of events on a channel in
  confirm mode, in the order of the calls, and returns a
  :class:`Confirmation` that completes once the broker confirmed them all.
  A worker that returns it lets the consumer book the next batch while the
  broker confirms this one's events (its ack waits for them): the database
  and the broker work side by side instead of in turn.

The same pattern serves metering (``services/metering/batching.py``); the two
belong together in ``services/common/`` once both have settled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import amqp
import eventlet
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
DEFAULT_BATCH_WAIT_MS = 20
DEFAULT_CONSUMERS = 1
# A consumer that lost the broker (or a batch that failed) waits this long.
RETRY_PAUSE_S = 1.0
CONFIRM_TIMEOUT_S = 30.0
_POLL_S = 0.2
_DRAIN_WHILE_BOOKING_S = 0.002


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
    """``@consume_batch(queue)``: the method receives ``list[RawMessage]``.

    ``CONSUMERS`` consumers (default 1) run side by side, each on its own
    channel; each batch locks its vouchers, so batches (and copies of the
    service) serialise on the vouchers they share and overlap on the rest.
    One consumer books the queue in its order (a correction after the record
    it corrects reverses it); with more, RabbitMQ deals the messages out in
    turn, so a correction may be booked first and its original refused as
    ``superseded`` (consistent books either way, as with copies of the
    service), in exchange for overlapping one batch's database work with
    another's.

    A worker may return a :class:`Confirmation` (or anything with ``wait()``)
    for its events: the consumer then hands over the next batch at once and
    acks this one when the confirmation completes, before the next ack (acks
    go in delivery order). One batch at most waits so; if its confirmation
    fails, that batch is requeued (the next one, booked meanwhile, is acked
    or requeued on its own confirmation).
    """

    def __init__(self, queue, **kwargs):
        self.queue = queue
        self._stopping = False
        self._threads: list = []
        super().__init__(**kwargs)

    def setup(self):
        self.amqp_uri = config[AMQP_URI]
        self.batch_size = int(config.get(BATCH_SIZE) or DEFAULT_BATCH_SIZE)
        wait_ms = config.get(BATCH_WAIT_MS)
        self.batch_wait_s = (
            DEFAULT_BATCH_WAIT_MS if wait_ms is None else wait_ms
        ) / 1e3
        # One batch being booked, one awaiting its confirms, one arriving.
        self.prefetch_count = int(config.get(PREFETCH_COUNT) or 3 * self.batch_size)
        self.consumers = int(config.get(CONSUMERS) or DEFAULT_CONSUMERS)

    def start(self):
        self._stopping = False
        self._threads = [
            self.container.spawn_managed_thread(
                self._run, identifier=f"batch_consumer_{n}"
            )
            for n in range(self.consumers)
        ]

    def stop(self):
        # Each finishes (and acks) the batch in hand; what it had prefetched
        # goes back to the queue when its connection closes.
        self._stopping = True
        for thread in self._threads:
            thread.wait()
        self._threads = []

    def kill(self):
        self._stopping = True
        for thread in self._threads:
            thread.kill()
        self._threads = []

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
        self._unconfirmed = None
        with Connection(self.amqp_uri, heartbeat=0) as connection:
            connection.ensure_connection(max_retries=1)
            consumer = KombuConsumer(
                connection.channel(),
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
                        wait = first_at + self.batch_wait_s - time.monotonic()
                    elif self._unconfirmed is not None:
                        self._settle()  # nothing to book meanwhile
                    if len(pending) < self.batch_size and wait > 0:
                        try:
                            connection.drain_events(timeout=wait)
                            continue
                        except TimeoutError:
                            pass
                    if pending:
                        batch = pending[: self.batch_size]
                        del pending[: self.batch_size]
                        self._handle(batch, connection, pending)
                        first_at = time.monotonic() if pending else None
                self._settle()

    def _handle(self, batch: list, connection, pending: list) -> None:
        done = Event()

        def handle_result(worker_ctx, result, exc_info):
            done.send((result, exc_info))
            return result, exc_info

        self.container.spawn_worker(
            self, ([_raw(m) for m in batch],), {}, handle_result=handle_result
        )
        # Receive the next deliveries (into ``pending``) while the worker
        # waits for the database: between the batches, decoding them kept
        # this loop nearly as long as the booking itself. A short timeout,
        # since the worker's end does not wake a read on the socket (py-amqp
        # keeps a frame that a timeout cut for the next read).
        while not done.ready():
            if len(pending) >= self.batch_size:
                break
            try:
                connection.drain_events(timeout=_DRAIN_WHILE_BOOKING_S)
            except TimeoutError:
                pass
        result, exc_info = done.wait()
        self._settle()  # the batch before this one: acks go in order
        if exc_info is not None:
            log.error("batch of %d failed; requeued", len(batch), exc_info=exc_info)
            self._requeue(batch[-1])
        elif hasattr(result, "wait"):
            self._unconfirmed = (batch[-1], result)
        else:
            self._ack(batch[-1])

    def _settle(self) -> None:
        """Ack the batch whose events were awaiting confirmation, once they
        are confirmed; requeue it if they are not."""
        if self._unconfirmed is None:
            return
        last, confirmation = self._unconfirmed
        self._unconfirmed = None
        try:
            confirmation.wait()
        except Exception:
            log.exception("the events of a batch were not confirmed; requeued")
            self._requeue(last)
        else:
            self._ack(last)

    @staticmethod
    def _ack(last) -> None:
        # Deliveries on one channel are acked in order: one ack covers all.
        last.channel.basic_ack(last.delivery_tag, multiple=True)

    @staticmethod
    def _requeue(last) -> None:
        eventlet.sleep(RETRY_PAUSE_S)  # so that a fault does not spin
        last.channel.basic_nack(last.delivery_tag, multiple=True, requeue=True)


consume_batch = BatchConsumer.decorator


class _ConfirmingChannel:
    """One connection and channel in confirm mode, counting the broker's acks."""

    def __init__(self, amqp_uri: str):
        self.connection = Connection(amqp_uri, heartbeat=0)
        self.connection.ensure_connection(max_retries=1)
        self.channel = self.connection.channel()
        self.channel.confirm_select()
        self.published = 0  # the delivery tag of the last publish
        self.confirmed = 0  # every tag up to this one is confirmed …
        self.acked: set[int] = set()  # … and these beyond it
        self.nacked = False
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.confirmed = max(self.confirmed, delivery_tag)
        else:
            self.acked.add(delivery_tag)
        while self.confirmed + 1 in self.acked:
            self.confirmed += 1
            self.acked.discard(self.confirmed)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self.nacked = True

    def publish_all(self, exchange: str, events: list[tuple[str, str, Any]]) -> None:
        # py-amqp sends each message with its own sendall(): on a busy host
        # the system calls (and the broker's wake-ups) cost more than all the
        # rest of publishing. The frames are gathered and sent in one write.
        transport = self.connection.connection.transport
        frames: list[bytes] = []
        send = transport.__dict__.get("_write")  # TCP: the socket's sendall
        if send is not None:
            transport._write = lambda data: frames.append(bytes(data))
        try:
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
        finally:
            if send is not None:
                transport._write = send
        if frames:
            send(b"".join(frames))
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while self.confirmed < self.published and not self.nacked:
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
            self.connection.release()
        except Exception:  # noqa: BLE001 - it is being dropped either way
            pass


class Confirmation(Event):
    """The broker's confirms of one ``publish``: ``wait()`` returns once every
    event is confirmed, or raises what went wrong."""


class ConfirmedPublisher(DependencyProvider):
    """Injects ``publish(events)``: events are ``(routing_key, message_id,
    payload)``; it returns a :class:`Confirmation` at once.

    One managed thread publishes the calls' events in order, on one channel,
    waiting for each call's confirms before the next: what a caller does
    after ``publish`` (returning, so that its consumer books the next batch)
    overlaps the broker's work, and the order of the events on the bus is
    the order of the calls.
    """

    def __init__(self, exchange):
        self.exchange = exchange
        self._queue: LightQueue = LightQueue()
        self._thread = None

    def setup(self):
        self.amqp_uri = config[AMQP_URI]

    def start(self):
        self._thread = self.container.spawn_managed_thread(
            self._run, identifier="confirmed_publisher"
        )

    def stop(self):
        # Workers and consumers have stopped: what is queued is published
        # (its batches are acked already or will be redelivered anyway).
        if self._thread is not None:
            self._queue.put(None)
            self._thread.wait()
            self._thread = None

    def kill(self):
        if self._thread is not None:
            self._thread.kill()
            self._thread = None

    def _run(self) -> None:
        channel = None
        try:
            while (item := self._queue.get()) is not None:
                events, confirmation = item
                try:
                    channel = channel or _ConfirmingChannel(self.amqp_uri)
                    channel.publish_all(self.exchange.name, events)
                except Exception as exc:  # noqa: BLE001 - the caller's to handle
                    if channel is not None:
                        channel.close()  # its count of confirms is no longer known
                        channel = None
                    confirmation.send_exception(exc)
                else:
                    confirmation.send(None)
        finally:
            if channel is not None:
                channel.close()

    def get_dependency(self, worker_ctx) -> Callable[[Iterable], Confirmation]:
        def publish(events: Iterable[tuple[str, str, Any]]) -> Confirmation:
            events = list(events)
            confirmation = Confirmation()
            if events:
                self._queue.put((events, confirmation))
            else:
                confirmation.send(None)
            return confirmation

        return publish
