"""Batch consumption and confirmed batch publishing, for every hot path.

nameko's ``@consume`` runs one worker (one transaction, one confirmed publish)
per message, and its ``Publisher`` waits for the broker's confirm of each
event before the next: at thousands of messages a second the round trips cost
more than the work itself. Here, once for every service:

- :class:`BatchConsumer` collects up to ``BATCH_SIZE`` deliveries, or what
  arrived within ``BATCH_WAIT_MS`` of the first, and hands them to **one**
  worker as a list of :class:`~services.common.amqp.RawMessage`. Acks are
  manual; how a batch is acked is the consumer's policy, one of two
  subclasses: :class:`RequeueingBatchConsumer` (the worker returns the
  indices of the messages to requeue) or :class:`ConfirmedBatchConsumer`
  (the worker may return a :class:`Confirmation`, and its batch is acked once
  that completes, in delivery order, while the next batch is worked on).
  A service subclasses one and sets its defaults
  (``services/<name>/batching.py``). Deliveries are read from their frames by
  hand (:func:`read_deliveries`: no py-amqp or kombu ``Message`` each), on a
  connection that reads the socket ahead (:data:`READ_CHUNK`).
- :class:`ConfirmingChannel` publishes a list of events on a channel in
  confirm mode, framed by hand and written in one socket write, and waits for
  the broker's confirms of all of them at once. Two dependency providers
  share it: :class:`ConfirmedPublisher` (``publish`` returns once the events
  are confirmed; a pool of channels, one per concurrent worker) and
  :class:`OrderedConfirmedPublisher` (``publish`` returns a
  :class:`Confirmation` at once; one thread publishes the calls in order).
"""

from __future__ import annotations

import errno
import json
import logging
import struct
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

import amqp
import amqp.exceptions
import amqp.serialization
import amqp.spec
import amqp.transport
import eventlet
from amqp.method_framing import frame_writer
from eventlet.event import Event
from eventlet.queue import LightQueue
from kombu import Connection
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

# A consumer that lost the broker (or a batch that failed) waits this long.
RETRY_PAUSE_S = 1.0
CONFIRM_TIMEOUT_S = 30.0
_POLL_S = 0.2
# How long one read waits while a worker runs: the worker's end does not wake
# a read on the socket (py-amqp keeps a frame that a timeout cut for the next
# read).
_RECEIVE_WHILE_WORKING_S = 0.002


# -- deliveries, read by hand ---------------------------------------------------


class Delivery:
    """One delivery to the batch consumer: its tag and the message."""

    __slots__ = ("delivery_tag", "message")

    def __init__(self, delivery_tag: int, message: RawMessage):
        self.delivery_tag = delivery_tag
        self.message = message


def _raw(message) -> Delivery:
    """A py-amqp delivery as a :class:`Delivery` (no kombu ``Message`` between)."""
    body = message.body
    if type(body) is not bytes:  # pragma: no cover - py-amqp hands out bytes
        body = body.encode() if isinstance(body, str) else bytes(body)
    properties = message.properties
    delivery = message.delivery_info
    return Delivery(
        delivery["delivery_tag"],
        RawMessage(
            body=body,
            headers=properties.get("application_headers") or {},
            properties=properties,
            routing_key=delivery["routing_key"],
            redelivered=bool(delivery["redelivered"]),
        ),
    )


# basic.deliver, read by hand: py-amqp makes a Message per delivery, decodes
# its arguments through the generic method loader and dispatches it through
# its channel's callbacks (most of the consumer's own time, by the profile).
# Here a delivery's three frames go straight to a RawMessage, with the
# properties py-amqp would have decoded (decode_properties). Every other
# frame goes to py-amqp.
_DELIVER = struct.pack(">HH", *amqp.spec.Basic.Deliver)

# What a usage message carries: content type and encoding, headers, delivery
# mode, priority, message id (AMQP's property flag bits).
_SIMPLE_PROPERTIES = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0800 | 0x0080
_LONG_STRING = ord("S")


class _NotSimple(Exception):
    pass


def decode_properties(buf: bytes, offset: int) -> dict[str, Any]:
    """``amqp.serialization.decode_properties_basic(buf, offset)[0]``.

    py-amqp's decoder reads a headers table item by item through its generic
    reader (half the cost of reading a delivery); a usage message has only
    the properties above and string headers, read here directly. Anything
    else (another property, a header of another type, text that is not
    UTF-8) is left to py-amqp, which decides it as ever.
    ``test_a_hand_read_delivery_is_what_py_amqp_delivers`` compares them.
    """
    (flags,) = struct.unpack_from(">H", buf, offset)
    if not flags & ~_SIMPLE_PROPERTIES & 0xFFFF:
        try:
            return _simple_properties(buf, offset + 2, flags)
        except (_NotSimple, UnicodeDecodeError, IndexError, struct.error):
            pass
    return amqp.serialization.decode_properties_basic(buf, offset)[0]


def _short_string(buf: bytes, offset: int) -> tuple[str, int]:
    end = offset + 1 + buf[offset]
    if end > len(buf):
        raise _NotSimple
    return buf[offset + 1 : end].decode("utf-8", "surrogatepass"), end


def _simple_properties(buf: bytes, offset: int, flags: int) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if flags & 0x8000:
        properties["content_type"], offset = _short_string(buf, offset)
    if flags & 0x4000:
        properties["content_encoding"], offset = _short_string(buf, offset)
    if flags & 0x2000:
        (size,) = struct.unpack_from(">I", buf, offset)
        offset += 4
        limit = offset + size
        headers = {}
        while offset < limit:
            key, offset = _short_string(buf, offset)
            if buf[offset] != _LONG_STRING:
                raise _NotSimple
            (length,) = struct.unpack_from(">I", buf, offset + 1)
            end = offset + 5 + length
            if end > limit:
                raise _NotSimple
            headers[key] = buf[offset + 5 : end].decode("utf-8", "surrogatepass")
            offset = end
        properties["application_headers"] = headers
    if flags & 0x1000:
        properties["delivery_mode"] = buf[offset]
        offset += 1
    if flags & 0x0800:
        properties["priority"] = buf[offset]
        offset += 1
    if flags & 0x0080:
        properties["message_id"], offset = _short_string(buf, offset)
    return properties


def read_deliveries(
    connection: Connection, channel_id: int, on_delivery: Callable[[Delivery], Any]
) -> None:
    """Hand channel ``channel_id``'s deliveries to ``on_delivery`` (as
    :class:`Delivery`) before py-amqp sees them; call before consuming."""
    raw = connection.connection
    fallback = raw.on_inbound_frame
    partial: list = []  # [delivery tag, redelivered, routing key, properties, size]
    chunks: list[bytes] = []

    def deliver() -> None:
        tag, redelivered, routing_key, properties, _size = partial
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        partial.clear()
        chunks.clear()
        on_delivery(
            Delivery(
                tag,
                RawMessage(
                    body=bytes(body),
                    headers=properties.get("application_headers") or {},
                    properties=properties,
                    routing_key=routing_key,
                    redelivered=redelivered,
                ),
            )
        )

    def on_frame(frame) -> Any:
        frame_type, channel, buf = frame
        if channel != channel_id:
            return fallback(frame)
        if partial:
            raw.bytes_recv += 1
            if frame_type == 2 and len(partial) == 3:  # the content header
                (size,) = struct.unpack_from(">Q", buf, 4)
                properties = decode_properties(buf, 12)
                partial.extend((properties, size))
                if not size:
                    deliver()
                return True
            if frame_type == 3 and len(partial) == 5:  # (part of) the body
                chunks.append(buf)
                if sum(map(len, chunks)) >= partial[4]:
                    deliver()
                return True
            if frame_type == 8:
                return False
            raise amqp.exceptions.UnexpectedFrame(
                f"Received frame {frame_type} in the middle of a delivery"
            )
        if frame_type == 1 and buf[:4] == _DELIVER:
            raw.bytes_recv += 1
            # consumer tag, delivery tag, redelivered, exchange, routing key
            offset = 5 + buf[4]
            tag, redelivered = struct.unpack_from(">QB", buf, offset)
            offset += 9
            offset += 1 + buf[offset]
            routing_key = buf[offset + 1 : offset + 1 + buf[offset]]
            partial.extend(
                (
                    tag,
                    bool(redelivered & 1),
                    routing_key.decode("utf-8", "surrogatepass"),
                )
            )
            return False
        return fallback(frame)

    raw.on_inbound_frame = on_frame


# -- reading the socket ahead ---------------------------------------------------

# py-amqp reads each frame with two ``recv`` calls of exactly the bytes it
# needs (7 for the header, then the payload): six system calls, each through
# eventlet's green socket, per delivery. Reading up to this much at once and
# keeping the rest in py-amqp's own read buffer serves most frames from memory.
READ_CHUNK = 16 * 1024


def _buffered_read(self, n, initial=False, _errnos=(errno.EAGAIN, errno.EINTR)):
    """``TCPTransport._read``, reading ahead ``READ_CHUNK`` bytes at a time."""
    rbuf = self._read_buffer
    if len(rbuf) >= n:
        self._read_buffer = rbuf[n:]
        return rbuf[:n]
    recv = self._quick_recv
    try:
        while len(rbuf) < n:
            try:
                s = recv(max(n - len(rbuf), READ_CHUNK))
            except OSError as exc:
                if exc.errno in _errnos:
                    if initial and self.raise_on_initial_eintr:
                        raise TimeoutError() from exc
                    continue
                raise
            if not s:
                raise OSError("Server unexpectedly closed connection")
            rbuf += s
    except:  # noqa: E722 - as py-amqp: keep what was read, whatever happened
        self._read_buffer = rbuf
        raise
    result, self._read_buffer = rbuf[:n], rbuf[n:]
    return result


_FRAME_END = 206


def _buffered_frame(transport) -> tuple[int, int, bytes] | None:
    """The next frame if it is whole in the read buffer (else None), taken out
    with one slice rather than py-amqp's three reads."""
    buf = transport._read_buffer
    if len(buf) < 8:
        return None
    frame_type, channel, size = struct.unpack_from(">BHI", buf)
    end = 7 + size
    if len(buf) <= end:
        return None
    if buf[end] != _FRAME_END:
        raise amqp.exceptions.UnexpectedFrame(
            f"Received frame_end {buf[end]:#04x} while expecting 0xce"
        )
    transport._read_buffer = buf[end + 1 :]
    return frame_type, channel, buf[7:end]


def buffer_reads(connection: Connection) -> bool:
    """Make a connected kombu/py-amqp connection read ahead (see READ_CHUNK);
    False if it cannot (TLS)."""
    transport = connection.connection.transport
    if not isinstance(transport, amqp.transport.TCPTransport):
        return False
    transport._read = types.MethodType(_buffered_read, transport)
    return True


def drain_buffered(connection: Connection, limit: int) -> int:
    """Handle up to ``limit`` frames already in the read buffer, without
    touching the socket (nor its timeout); returns how many."""
    raw = connection.connection
    transport = raw.transport
    handled = 0
    while handled < limit:
        frame = _buffered_frame(transport)
        if frame is None:
            break
        raw.on_inbound_frame(frame)
        handled += 1
    return handled


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
        super().__init__(**kwargs)

    def setup(self):
        self.amqp_uri = config[AMQP_URI]
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
                log.warning("batch consumer lost the broker (%r); reconnecting", exc)
                eventlet.sleep(RETRY_PAUSE_S)

    def _consume(self) -> None:
        # py-amqp directly, not kombu's Consumer: no kombu Message per delivery.
        pending: list[Delivery] = []
        with Connection(self.amqp_uri, heartbeat=0) as connection:
            connection.ensure_connection(max_retries=1)
            buffered = buffer_reads(connection)
            channel = connection.channel()
            self.queue(channel).declare()
            channel.basic_qos(0, self.prefetch_count, False)
            read_deliveries(connection, channel.channel_id, pending.append)
            channel.basic_consume(
                self.queue.name,
                callback=lambda message: pending.append(_raw(message)),
                no_ack=False,
            )

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
            self.channel.basic_nack(batch[-1].delivery_tag, multiple=True, requeue=True)
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


class _AckWhenConfirmed(_Acks):
    def __init__(self, channel):
        super().__init__(channel)
        # The last delivery of the batch awaiting its confirmation, and that.
        self.unconfirmed: tuple[Delivery, Any] | None = None

    def done(self, batch: list[Delivery], result: Any, exc_info) -> None:
        self.settle()  # the batch before this one: acks go in order
        if exc_info is not None:
            log.error("batch of %d failed; requeued", len(batch), exc_info=exc_info)
            self._requeue(batch[-1])
        elif hasattr(result, "wait"):
            self.unconfirmed = (batch[-1], result)
        else:
            self._ack(batch[-1])

    def settle(self) -> None:
        """Ack the batch whose events were awaiting confirmation, once they
        are confirmed; requeue it if they are not."""
        if self.unconfirmed is None:
            return
        last, confirmation = self.unconfirmed
        self.unconfirmed = None
        try:
            confirmation.wait()
        except Exception:
            log.exception("the events of a batch were not confirmed; requeued")
            self._requeue(last)
        else:
            self._ack(last)

    idle = close = settle

    def _ack(self, last: Delivery) -> None:
        # Deliveries on one channel are acked in order: one ack covers all.
        self.channel.basic_ack(last.delivery_tag, multiple=True)

    def _requeue(self, last: Delivery) -> None:
        eventlet.sleep(RETRY_PAUSE_S)  # so that a fault does not spin
        self.channel.basic_nack(last.delivery_tag, multiple=True, requeue=True)


class ConfirmedBatchConsumer(BatchConsumer):
    """The worker may return a :class:`Confirmation` (or anything with
    ``wait()``) for its events.

    The consumer then hands over the next batch at once and acks this one
    when the confirmation completes, before the next ack (acks go in
    delivery order). One batch at most waits so; if its confirmation fails,
    that batch is requeued (the next one, worked on meanwhile, is acked or
    requeued on its own confirmation). If the worker raises, its batch is
    requeued after a pause. The next deliveries are read while a worker runs.
    """

    prefetch_batches = 3  # one being worked on, one awaiting confirms, one arriving
    receive_while_working = True
    _acks = _AckWhenConfirmed


# -- publishing -------------------------------------------------------------------


class _Collector:
    """A stand-in transport for py-amqp's frame writer: keeps the frames."""

    def __init__(self, frames: list[bytes]):
        self.frames = frames

    def write(self, view) -> None:
        self.frames.append(bytes(view))  # the writer reuses its buffer


# basic.publish of one event, framed by hand: py-amqp builds a Message, packs
# its properties and frames it field by field for every event; here only the
# message id and the body change. Properties: content_type, content_encoding,
# delivery_mode, message_id (their flag bits, in the order AMQP 0-9-1 fixes).
# ``test_hand_framed_publish_is_what_py_amqp_writes`` compares the bytes.
_PUBLISH_FLAGS = 0x8000 | 0x4000 | 0x1000 | 0x0080
_PROPERTIES_PREFIX = (
    struct.pack(">H", _PUBLISH_FLAGS) + b"\x10application/json" + b"\x05utf-8" + b"\x02"
)
_BASIC_CLASS = 60


def _frame(frame_type: int, channel_id: int, payload: bytes) -> bytes:
    return b"".join(
        (struct.pack(">BHI", frame_type, channel_id, len(payload)), payload, b"\xce")
    )


def publish_method_frame(channel_id: int, exchange: str, routing_key: str) -> bytes:
    args = amqp.serialization.dumps("Bssbb", (0, exchange, routing_key, False, False))
    return _frame(1, channel_id, struct.pack(">HH", *amqp.spec.Basic.Publish) + args)


def publish_content_frames(
    channel_id: int, message_id: str, body: bytes, frame_max: int
) -> bytes | None:
    """The header and body frames of one event, or None when py-amqp must
    frame it (a body to split over frames, an id longer than a short string)."""
    mid = message_id.encode()
    if not body or len(mid) > 255 or len(body) + 64 + len(mid) > frame_max - 8:
        return None
    header = b"".join(
        (
            struct.pack(">HHQ", _BASIC_CLASS, 0, len(body)),
            _PROPERTIES_PREFIX,
            bytes((len(mid),)),
            mid,
        )
    )
    return _frame(2, channel_id, header) + _frame(3, channel_id, body)


class ConfirmingChannel:
    """One connection and channel in confirm mode, counting the broker's acks.

    ``publish_all`` frames a list of events by hand (py-amqp frames what
    cannot be: a body over several frames, a long id), sends them in one
    write and waits for their confirms. A channel whose ``publish_all``
    raised no longer knows which events were confirmed: close it.
    """

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
        # From here on, frames are collected and sent in one write per batch
        # (py-amqp writes each frame on its own: a system call per event).
        self._frames: list[bytes] = []
        self._methods: dict[tuple[str, str], bytes] = {}
        raw = self.connection.connection
        raw.frame_writer = frame_writer(raw, _Collector(self._frames))

    def _flush(self) -> None:
        data = b"".join(self._frames)
        self._frames.clear()
        self.connection.connection.transport.write(data)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        # A watermark: a multiple ack moves it, whatever the number of events.
        if multiple:
            if delivery_tag > self.confirmed:
                self.confirmed = delivery_tag
                if self.acked:  # only the single acks that came out of order
                    self.acked = {tag for tag in self.acked if tag > delivery_tag}
        elif delivery_tag > self.confirmed:
            self.acked.add(delivery_tag)
        while self.confirmed + 1 in self.acked:
            self.confirmed += 1
            self.acked.discard(self.confirmed)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self.nacked = True

    def publish_all(
        self, exchange: str, events: Iterable[tuple[str, str, Any]]
    ) -> None:
        """Publish ``(routing_key, message_id, payload)`` events (the payload
        JSON-serialisable, or its JSON as bytes) and wait for their confirms;
        raises if the broker nacked one or did not confirm them in time."""
        start = self.published
        channel_id = self.channel.channel_id
        frame_max = self.connection.connection.frame_max
        for routing_key, message_id, payload in events:
            body = (
                payload
                if type(payload) is bytes  # JSON made by the caller
                else json.dumps(payload, separators=(",", ":")).encode()
            )
            content = publish_content_frames(channel_id, message_id, body, frame_max)
            if content is None:
                self.channel.basic_publish(
                    amqp.Message(
                        body=body,
                        content_type="application/json",
                        content_encoding="utf-8",
                        delivery_mode=2,
                        message_id=message_id,
                    ),
                    exchange,
                    routing_key,
                )
            else:
                method = self._methods.get((exchange, routing_key))
                if method is None:
                    method = publish_method_frame(channel_id, exchange, routing_key)
                    self._methods[(exchange, routing_key)] = method
                self._frames.append(method)
                self._frames.append(content)
            self.published += 1
        if self.published == start:
            return
        self._flush()
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
            raw = self.connection.connection
            raw.frame_writer = frame_writer(raw, raw.transport)  # write directly
            self.connection.release()
        except Exception:  # noqa: BLE001 - it is being dropped either way
            pass


class _ConfirmedPublishing(DependencyProvider):
    """What both publishers share: the exchange and the broker."""

    def __init__(self, exchange):
        self.exchange = exchange

    def setup(self):
        self.amqp_uri = config[AMQP_URI]


class ConfirmedPublisher(_ConfirmedPublishing):
    """Injects ``publish(events)``: events are ``(routing_key, message_id,
    payload)``, the payload JSON-serialisable or its JSON bytes; it returns
    once the broker confirmed every one, or raises. Concurrent workers each
    take a channel of a pool."""

    def __init__(self, exchange):
        super().__init__(exchange)
        self._idle: LightQueue = LightQueue()

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
                channel = ConfirmingChannel(self.amqp_uri)
            try:
                channel.publish_all(self.exchange.name, events)
            except BaseException:
                channel.close()  # its count of confirms is no longer known
                raise
            self._idle.put(channel)

        return publish


class Confirmation(Event):
    """The broker's confirms of one ``publish``: ``wait()`` returns once every
    event is confirmed, or raises what went wrong."""


class OrderedConfirmedPublisher(_ConfirmedPublishing):
    """Injects ``publish(events)`` (as :class:`ConfirmedPublisher`'s); it
    returns a :class:`Confirmation` at once.

    One managed thread publishes the calls' events in order, on one channel,
    waiting for each call's confirms before the next: what a caller does
    after ``publish`` (returning, so that its consumer works on the next
    batch) overlaps the broker's work, and the order of the events on the bus
    is the order of the calls.
    """

    def __init__(self, exchange):
        super().__init__(exchange)
        self._queue: LightQueue = LightQueue()
        self._thread = None

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
                    channel = channel or ConfirmingChannel(self.amqp_uri)
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
