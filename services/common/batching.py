"""Batch consumption, for every hot path.

nameko's ``@consume`` runs one worker (one transaction, one confirmed publish)
per message: at thousands of messages a second the round trips cost more than
the work itself. Here, once for every service, :class:`BatchConsumer`
collects up to ``BATCH_SIZE`` deliveries, or what arrived within
``BATCH_WAIT_MS`` of the first, and hands them to **one** worker as a list of
:class:`~services.common.amqp.RawMessage`. Acks are manual; how a batch is
acked is the consumer's policy, one of two subclasses:
:class:`RequeueingBatchConsumer` (the worker returns the indices of the
messages to requeue) or :class:`ConfirmedBatchConsumer` (the worker may return
a :class:`~services.common.publishing.Confirmation`, and its batch is acked
once that completes, in delivery order, while the next batch is worked on;
or a :class:`Requeue`, the same but for the messages it names).
A service subclasses one and sets its defaults (``services/<name>/batching.py``).
Deliveries are read from their frames by hand (``services/common/deliveries.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import eventlet
from eventlet.event import Event
from kombu import Connection
from nameko import config
from nameko.extensions import Entrypoint

from services.common.backoff import Backoff
from services.common.broker_tls import broker_ssl
from services.common.config import (
    AMQP_URI,
    BATCH_SIZE,
    BATCH_WAIT_MS,
    CONSUMERS,
    PREFETCH_COUNT,
)
from services.common.deliveries import (
    Delivery,
    as_delivery,
    basic_nack,
    buffer_reads,
    drain_buffered,
    read_deliveries,
)

log = logging.getLogger(__name__)

# A consumer that lost the broker (or a batch that failed) waits this long.
RETRY_PAUSE_S = 1.0
_POLL_S = 0.2
# How long one read waits while a worker runs: the worker's end does not wake
# a read on the socket (py-amqp keeps a frame that a timeout cut for the next
# read).
_RECEIVE_WHILE_WORKING_S = 0.002


# -- the consumer -----------------------------------------------------------------


class _Acks:
    """How one consumer (one connection and channel) acks its batches."""

    def __init__(self, channel):
        self.channel = channel

    def done(self, batch: list[Delivery], result: Any, exc_info) -> None:
        """The worker of ``batch`` returned ``result`` (or raised)."""
        raise NotImplementedError

    def idle(self) -> None:
        """Nothing is pending: a moment to catch up."""

    def close(self) -> None:
        """The consumer stops; its connection is still open."""


class BatchConsumer(Entrypoint):
    """``@consume_batch(queue)``: the method receives ``list[RawMessage]``.

    The base of the two acking policies below; a service subclasses one and
    sets the defaults of ``BATCH_SIZE``, ``BATCH_WAIT_MS``, ``CONSUMERS`` and
    ``PREFETCH_COUNT`` (``prefetch_batches`` batches) that its config may
    override. ``CONSUMERS`` consumers run side by side, each on its own
    connection and channel.
    """

    default_batch_size = 200
    default_batch_wait_ms = 50
    default_consumers = 1
    prefetch_batches = 2
    # Read the next deliveries while a worker runs (else only between them).
    receive_while_working = False
    _acks: type[_Acks]

    def __init__(self, queue, **kwargs):
        self.queue = queue
        self._stopping = False
        self._threads: list = []
        # Jittered and growing: the consumers of a whole country that lost
        # the same broker node do not come back in lockstep (issue 16).
        self._backoff = Backoff(initial=RETRY_PAUSE_S / 2, cap=30.0)
        super().__init__(**kwargs)

    def setup(self):
        self.amqp_uri = config[AMQP_URI]
        self.ssl = broker_ssl(config)
        self.batch_size = int(config.get(BATCH_SIZE) or self.default_batch_size)
        wait_ms = config.get(BATCH_WAIT_MS)
        if wait_ms is None:
            wait_ms = self.default_batch_wait_ms
        self.batch_wait_s = float(wait_ms) / 1e3
        self.prefetch_count = int(
            config.get(PREFETCH_COUNT) or self.prefetch_batches * self.batch_size
        )
        self.consumers = int(config.get(CONSUMERS) or self.default_consumers)

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
                delay = self._backoff.next_delay()
                log.warning(
                    "batch consumer lost the broker (%r); reconnecting in %.1f s",
                    exc,
                    delay,
                )
                eventlet.sleep(delay)

    def _consume(self) -> None:
        # py-amqp directly, not kombu's Consumer: no kombu Message per delivery.
        pending: list[Delivery] = []
        with Connection(self.amqp_uri, heartbeat=0, ssl=self.ssl) as connection:
            connection.ensure_connection(max_retries=1)
            # Over TLS py-amqp reads the socket (its SSLTransport); the frames
            # are still read by hand (read_deliveries).
            buffered = buffer_reads(connection)
            channel = connection.channel()
            self.queue(channel).declare()
            channel.basic_qos(0, self.prefetch_count, False)
            read_deliveries(connection, channel.channel_id, pending.append)
            channel.basic_consume(
                self.queue.name,
                callback=lambda message: pending.append(as_delivery(message)),
                no_ack=False,
            )
            self._backoff.reset()  # consuming again

            def receive(timeout: float) -> bool:
                """Deliveries into ``pending``: the frames already read, else
                one read of up to ``timeout``; False if it timed out."""
                # Three frames a delivery.
                wanted = 3 * max(1, self.batch_size - len(pending))
                if buffered and drain_buffered(connection, wanted):
                    return True
                try:
                    connection.drain_events(timeout=timeout)
                except TimeoutError:
                    return False
                return True

            acks = self._acks(channel)
            first_at = None
            while not self._stopping:
                wait = _POLL_S
                if pending:
                    first_at = first_at or time.monotonic()
                    wait = max(0.0, first_at + self.batch_wait_s - time.monotonic())
                else:
                    acks.idle()
                if len(pending) < self.batch_size and wait > 0 and receive(wait):
                    continue
                if pending:
                    batch = pending[: self.batch_size]
                    del pending[: self.batch_size]
                    first_at = None
                    acks.done(batch, *self._work(batch, pending, receive))
            acks.close()

    def _work(
        self,
        batch: list[Delivery],
        pending: list[Delivery],
        receive: Callable[[float], bool],
    ) -> tuple[Any, Any]:
        """Run the worker on ``batch``: its ``(result, exc_info)``."""
        done = Event()

        def handle_result(worker_ctx, result, exc_info):
            done.send((result, exc_info))
            return result, exc_info

        self.container.spawn_worker(
            self,
            ([delivery.message for delivery in batch],),
            {},
            handle_result=handle_result,
        )
        if self.receive_while_working:
            # The next deliveries arrive (into ``pending``) while the worker
            # waits for the database, instead of after it.
            while not done.ready() and len(pending) < self.batch_size:
                receive(_RECEIVE_WHILE_WORKING_S)
        return done.wait()


class _RequeueIndices(_Acks):
    def done(self, batch: list[Delivery], result: Any, exc_info) -> None:
        if exc_info is not None:
            log.error("batch of %d failed; requeued", len(batch), exc_info=exc_info)
            eventlet.sleep(RETRY_PAUSE_S)  # so a fault does not spin
            basic_nack(
                self.channel, batch[-1].delivery_tag, multiple=True, requeue=True
            )
            return
        requeue = set(result or ())
        if not requeue:
            self.channel.basic_ack(batch[-1].delivery_tag, multiple=True)
            return
        eventlet.sleep(RETRY_PAUSE_S)
        for index, delivery in enumerate(batch):
            tag = delivery.delivery_tag
            if index in requeue:
                self.channel.basic_reject(tag, requeue=True)
            else:
                self.channel.basic_ack(tag)


class RequeueingBatchConsumer(BatchConsumer):
    """The worker returns the indices of the messages to requeue (or None).

    The batch is acked once the worker returned (its transaction committed
    and its events confirmed); the messages it names are requeued after a
    pause, the others acked. If it raises, the whole batch is requeued after
    a pause.
    """

    _acks = _RequeueIndices


class Requeue(NamedTuple):
    """What a :class:`ConfirmedBatchConsumer`'s worker returns when some
    messages of its batch are to be tried again and the others are done
    (booked one by one after the batch failed as a whole): the indices to
    requeue, and the confirmation of the done ones' events (or None)."""

    indices: frozenset[int]
    confirmation: Any = None


class _AckWhenConfirmed(_Acks):
    def __init__(self, channel):
        super().__init__(channel)
        # The batch awaiting its confirmation, that, and what to requeue of it.
        self.unconfirmed: tuple[list[Delivery], Any, frozenset[int]] | None = None

    def done(self, batch: list[Delivery], result: Any, exc_info) -> None:
        self.settle()  # the batch before this one: acks go in order
        if exc_info is not None:
            log.error("batch of %d failed; requeued", len(batch), exc_info=exc_info)
            self._requeue(batch[-1])
        elif isinstance(result, Requeue):
            self.unconfirmed = (batch, result.confirmation, result.indices)
        elif hasattr(result, "wait"):
            self.unconfirmed = (batch, result, frozenset())
        else:
            self._ack(batch[-1])

    def settle(self) -> None:
        """Ack the batch whose events were awaiting confirmation, once they
        are confirmed (but the messages its worker asked to requeue); requeue
        it all if they are not."""
        if self.unconfirmed is None:
            return
        batch, confirmation, requeue = self.unconfirmed
        self.unconfirmed = None
        try:
            if confirmation is not None:
                confirmation.wait()
        except Exception:
            log.exception("the events of a batch were not confirmed; requeued")
            self._requeue(batch[-1])
        else:
            if requeue:
                self._ack_but(batch, requeue)
            else:
                self._ack(batch[-1])

    idle = close = settle

    def _ack(self, last: Delivery) -> None:
        # Deliveries on one channel are acked in order: one ack covers all.
        self.channel.basic_ack(last.delivery_tag, multiple=True)

    def _requeue(self, last: Delivery) -> None:
        eventlet.sleep(RETRY_PAUSE_S)  # so that a fault does not spin
        basic_nack(self.channel, last.delivery_tag, multiple=True, requeue=True)

    def _ack_but(self, batch: list[Delivery], requeue: frozenset[int]) -> None:
        """Each delivery on its own: the ones named requeued (after a pause,
        so that a fault does not spin), the others acked. Settled one by one,
        none is left for the next batch's ``multiple`` ack to cover."""
        eventlet.sleep(RETRY_PAUSE_S)
        for index, delivery in enumerate(batch):
            if index in requeue:
                self.channel.basic_reject(delivery.delivery_tag, requeue=True)
            else:
                self.channel.basic_ack(delivery.delivery_tag)


class ConfirmedBatchConsumer(BatchConsumer):
    """The worker may return a :class:`Confirmation` (or anything with
    ``wait()``) for its events, or a :class:`Requeue` of the messages to try
    again with the confirmation of the others'.

    The consumer then hands over the next batch at once and acks this one
    when the confirmation completes, before the next ack (acks go in
    delivery order). One batch at most waits so; if its confirmation fails,
    that batch is requeued (the next one, worked on meanwhile, is acked or
    requeued on its own confirmation). If the worker raises, its batch is
    requeued after a pause. A :class:`Requeue` is settled like a
    confirmation, then message by message: the ones it names requeued, the
    others acked. The next deliveries are read while a worker runs.
    """

    prefetch_batches = 3  # one being worked on, one awaiting confirms, one arriving
    receive_while_working = True
    _acks = _AckWhenConfirmed
