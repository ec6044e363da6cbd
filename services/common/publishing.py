"""Confirmed batch publishing, for every hot path.

nameko's ``Publisher`` waits for the broker's confirm of each event before
the next. :class:`ConfirmingChannel` publishes a list of events on a channel
in confirm mode, framed by hand and written in one socket write, and waits for
the broker's confirms of all of them at once. Two dependency providers share
it: :class:`ConfirmedPublisher` (``publish`` returns once the events are
confirmed; a pool of channels, one per concurrent worker) and
:class:`OrderedConfirmedPublisher` (``publish`` returns a
:class:`Confirmation` at once; one thread publishes the calls in order).
"""

from __future__ import annotations

import json
import logging
import struct
import time
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
from nameko.extensions import DependencyProvider

from services.common.broker_tls import broker_ssl
from services.common.config import (
    AMQP_URI,
)

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 30.0


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


def publish_method_frame(
    channel_id: int, exchange: str, routing_key: str, mandatory: bool = False
) -> bytes:
    args = amqp.serialization.dumps(
        "Bssbb", (0, exchange, routing_key, mandatory, False)
    )
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


class Unroutable(ConnectionError):
    """The broker returned ``mandatory`` events: no queue is bound for their
    routing keys. They were not delivered; the caller must not ack upstream."""

    def __init__(self, routing_keys: list[str]):
        self.routing_keys = routing_keys
        shown = ", ".join(sorted(set(routing_keys))[:5])
        super().__init__(
            f"{len(routing_keys)} event(s) returned unroutable: no queue bound "
            f"for {shown}"
        )


class ConfirmingChannel:
    """One connection and channel in confirm mode, counting the broker's acks.

    ``publish_all`` frames a list of events by hand (py-amqp frames what
    cannot be: a body over several frames, a long id), sends them in one
    write and waits for their confirms. A channel whose ``publish_all``
    raised no longer knows which events were confirmed: close it.

    ``mandatory``: the broker returns an event no queue is bound for (before
    its confirm) instead of confirming and dropping it; ``publish_all`` then
    raises :class:`Unroutable`.
    """

    def __init__(self, amqp_uri: str, ssl: dict | None = None, mandatory: bool = False):
        self.mandatory = mandatory
        self.returned: list[str] = []  # routing keys of returned events
        self.connection = Connection(amqp_uri, heartbeat=0, ssl=ssl)
        self.connection.ensure_connection(max_retries=1)
        self.channel = self.connection.channel()
        self.channel.confirm_select()
        self.published = 0  # the delivery tag of the last publish
        self.confirmed = 0  # every tag up to this one is confirmed …
        self.acked: set[int] = set()  # … and these beyond it
        self.nacked = False
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
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

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        self.returned.append(routing_key)

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
                    mandatory=self.mandatory,
                )
            else:
                method = self._methods.get((exchange, routing_key))
                if method is None:
                    method = publish_method_frame(
                        channel_id, exchange, routing_key, self.mandatory
                    )
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
        if self.returned:
            # Every confirm has come, so every return before it: the channel
            # stays usable for the next call.
            returned, self.returned = self.returned, []
            raise Unroutable(returned)

    def close(self) -> None:
        try:
            raw = self.connection.connection
            raw.frame_writer = frame_writer(raw, raw.transport)  # write directly
            self.connection.release()
        except Exception:  # noqa: BLE001 - it is being dropped either way
            pass


class _ConfirmedPublishing(DependencyProvider):
    """What both publishers share: the exchange, the broker and whether the
    events must reach a queue (``mandatory``: an event no queue is bound for
    fails its publish with :class:`Unroutable`, never confirmed and dropped)."""

    def __init__(self, exchange, mandatory: bool = False):
        self.exchange = exchange
        self.mandatory = mandatory

    def setup(self):
        self.amqp_uri = config[AMQP_URI]
        self.ssl = broker_ssl(config)


class ConfirmedPublisher(_ConfirmedPublishing):
    """Injects ``publish(events)``: events are ``(routing_key, message_id,
    payload)``, the payload JSON-serialisable or its JSON bytes; it returns
    once the broker confirmed every one, or raises. Concurrent workers each
    take a channel of a pool."""

    def __init__(self, exchange, mandatory: bool = False):
        super().__init__(exchange, mandatory)
        self._idle: LightQueue = LightQueue()

    def start(self):
        # Declared once, so a city's queue can bind to it before any event.
        with Connection(self.amqp_uri, ssl=self.ssl) as connection:
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
                channel = ConfirmingChannel(self.amqp_uri, self.ssl, self.mandatory)
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

    def __init__(self, exchange, mandatory: bool = False):
        super().__init__(exchange, mandatory)
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
                    channel = channel or ConfirmingChannel(
                        self.amqp_uri, self.ssl, self.mandatory
                    )
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
