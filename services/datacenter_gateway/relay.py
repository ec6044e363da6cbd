"""The relay: publishes the outbox to ``computenet.usage``, signed, with confirms.

Usage records go out on ``<dc>.usage``, binding requests (the tenants'
vouchers, CONTRACTS.md §6) on ``<dc>.binding``, each with its id as
``message_id``.

It owns its retry loop (DESIGN.md §3): on any broker error it logs one line,
backs off (0.5 s doubling to 30 s), reconnects and resumes by itself. A row is
marked published only after the broker confirmed it *and* routed it to a queue
(``mandatory``): a record is never dropped, at worst published twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import amqp
from amqp.exceptions import MessageNacked
from kombu import Connection, Producer

from services.common import telemetry
from services.common.amqp import USAGE_EXCHANGE, binding_key, usage_key
from services.common.backoff import Backoff
from services.common.principals import username_of
from services.common.units import utcnow
from services.datacenter_gateway import domain
from services.datacenter_gateway.background import BackgroundLoop
from services.datacenter_gateway.outbox import Outbox, PendingRow

log = logging.getLogger("computenet.datacenter_gateway.relay")

CONNECT_TIMEOUT_S = 5.0
CONFIRM_TIMEOUT_S = 10.0
HEARTBEAT_S = 30
CONTENT_TYPE = "application/json"


@dataclass
class RelayStatus:
    """What the relay tells ``GET /v1/status``."""

    broker_reachable: bool = False
    last_confirm_at: datetime | None = None
    published_total: int = 0
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reachable(self) -> None:
        with self.lock:
            self.broker_reachable = True
            self.last_error = None

    def confirmed(self, count: int) -> None:
        with self.lock:
            self.broker_reachable = True
            self.last_confirm_at = utcnow()
            self.published_total += count

    def failed(self, error: str, reachable: bool = False) -> None:
        with self.lock:
            self.broker_reachable = reachable
            self.last_error = error


class Unroutable(Exception):
    """The broker returned messages: no queue is bound for the routing key yet."""


def open_producer(
    amqp_uri: str, on_return=None, ssl: dict | None = None
) -> tuple[Connection, Producer]:
    """A connection with publisher confirms; its producer declared the exchange.
    ``ssl`` is kombu's (``services/common/broker_tls.py``)."""
    conn = Connection(
        amqp_uri,
        ssl=ssl,
        transport_options={"confirm_publish": True, "max_retries": 1},
        connect_timeout=CONNECT_TIMEOUT_S,
        heartbeat=HEARTBEAT_S,
    )
    try:
        conn.connect()
        producer = Producer(
            conn.default_channel,
            exchange=USAGE_EXCHANGE,
            auto_declare=True,
            on_return=on_return,
        )
    except Exception:
        conn.release()
        raise
    return conn, producer


def publish_signed(
    producer: Producer,
    body: bytes,
    routing_key: str,
    message_id: str,
    key_id: str,
    secret: str,
    *,
    user_id: str,
    mandatory: bool = False,
) -> None:
    """One message of CONTRACTS.md §1/§2: exact bytes, signed, persistent,
    confirmed, with the connection's user as ``user_id`` (the broker validates
    it; metering refuses another data centre's or none)."""
    headers = domain.message_headers(body, key_id, secret)
    telemetry.inject(headers)
    producer.publish(
        body,
        exchange=USAGE_EXCHANGE,
        routing_key=routing_key,
        content_type=CONTENT_TYPE,
        content_encoding="utf-8",
        delivery_mode=2,
        message_id=message_id,
        headers=headers,
        mandatory=mandatory,
        user_id=user_id,
        retry=False,
        timeout=CONFIRM_TIMEOUT_S,
        confirm_timeout=CONFIRM_TIMEOUT_S,
    )


class Relay(BackgroundLoop):
    """Publishes unpublished outbox rows in order, in batches, until stopped.

    One batch = publish every row on a channel in confirm mode, then wait for
    the broker's acks of the whole batch (one round trip per batch, not per
    message), then mark the acked, routed rows published in one transaction.

    Binding requests go first, in a batch of their own. Returned unroutable
    (no metering that takes them yet), they wait with a back-off of their
    own: usage is not held up by them.
    """

    thread_name = "relay"
    stop_timeout_s = 15.0

    def __init__(
        self,
        outbox: Outbox,
        amqp_uri: str,
        datacenter_id: str,
        key_id: str,
        secret: str,
        batch_size: int = 500,
        status: RelayStatus | None = None,
        poll_interval_s: float = 0.2,
        keys: domain.SigningKeys | None = None,
        ssl: dict | None = None,
    ):
        self.outbox = outbox
        self.amqp_uri = amqp_uri
        self.user_id = username_of(amqp_uri)
        self.ssl = ssl  # kombu's, from services/common/broker_tls.py
        self.datacenter_id = datacenter_id
        self.routing_key = usage_key(datacenter_id)
        self.binding_key = binding_key(datacenter_id)
        self._bindings_backoff = Backoff()
        self._bindings_due = 0.0  # time.monotonic() of the next binding batch
        self.keys = keys or domain.SigningKeys(domain.SigningKey(key_id, secret))
        self.batch_size = max(1, int(batch_size))
        self.status = status or RelayStatus()
        self.poll_interval_s = poll_interval_s
        super().__init__()
        self._conn: Connection | None = None
        self._channel = None  # py-amqp channel in confirm mode
        self._tag = 0  # delivery tag of the last message published
        self._unconfirmed: set[int] = set()
        self._nacked: set[int] = set()
        self._returned: set[str] = set()

    # -- lifecycle ------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._connect()
                published = self.publish_pending()
                backoff.reset()
                if published == 0:
                    self._idle()
            except Unroutable as exc:
                delay = backoff.next_delay()
                log.warning("relay: %s; retrying in %.1f s", exc, delay)
                self.status.failed(str(exc), reachable=True)
                self._stop.wait(delay)
            except Exception as exc:  # noqa: BLE001 - the relay must never die
                delay = backoff.next_delay()
                log.warning(
                    "relay: %s: %s; reconnecting in %.1f s",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                self.status.failed(f"{type(exc).__name__}: {exc}")
                self._disconnect()
                self._stop.wait(delay)
        self._disconnect()

    # -- one pass -------------------------------------------------------------

    def publish_pending(self) -> int:
        """Publish up to one batch of binding requests and one of records;
        returns how many rows are now published."""
        published = self._publish_bindings()
        rows = self.outbox.pending(self.batch_size)
        if not rows:
            return published
        done, returned, nacked = self._publish_rows(
            rows, self.routing_key, "datacenter_gateway.publish"
        )
        self.outbox.mark_published(done)
        if done:
            self.status.confirmed(len(done))
        if returned:
            raise Unroutable(
                f"{returned} records returned unroutable: no queue bound to "
                f"{USAGE_EXCHANGE.name} for {self.routing_key!r} (is metering running?)"
            )
        if nacked:
            raise MessageNacked(f"the broker refused {nacked} records")
        return published + len(done)

    def _publish_bindings(self) -> int:
        if time.monotonic() < self._bindings_due:
            return 0
        rows = self.outbox.pending_bindings(self.batch_size)
        if not rows:
            return 0
        done, returned, nacked = self._publish_rows(
            rows, self.binding_key, "datacenter_gateway.publish_bindings"
        )
        self.outbox.mark_bindings_published(done)
        if done:
            self.status.confirmed(len(done))
        if nacked:
            raise MessageNacked(f"the broker refused {nacked} binding requests")
        if returned:
            delay = self._bindings_backoff.next_delay()
            self._bindings_due = time.monotonic() + delay
            message = (
                f"{returned} binding requests returned unroutable: no queue bound "
                f"to {USAGE_EXCHANGE.name} for {self.binding_key!r}"
            )
            log.warning("relay: %s; retrying them in %.1f s", message, delay)
            self.status.failed(message, reachable=True)
        else:
            self._bindings_backoff.reset()
        return len(done)

    def _publish_rows(
        self, rows: list[PendingRow], routing_key: str, span_name: str
    ) -> tuple[list[int], int, int]:
        """Publish ``rows`` signed on ``routing_key`` and wait for the
        confirms: (ids of the acked and routed rows, returned, nacked)."""
        if self._channel is None:
            self._connect()
        channel = self._channel
        key = self.keys.active(utcnow())
        self._returned.clear()
        self._nacked.clear()
        tags: list[int] = []
        with telemetry.tracer.start_as_current_span(span_name) as span:
            span.set_attribute("computenet.records", len(rows))
            for row in rows:
                headers = domain.message_headers(row.body, key.key_id, key.secret)
                if row.traceparent:
                    # The trace of the POST that stored it continues downstream.
                    headers["traceparent"] = row.traceparent
                channel.basic_publish(
                    amqp.Message(
                        row.body,
                        content_type=CONTENT_TYPE,
                        content_encoding="utf-8",
                        delivery_mode=2,
                        message_id=row.record_id,
                        application_headers=headers,
                        # validated by the broker, checked by metering
                        user_id=self.user_id,
                    ),
                    exchange=USAGE_EXCHANGE.name,
                    routing_key=routing_key,
                    mandatory=True,
                )
                self._tag += 1
                tags.append(self._tag)
                self._unconfirmed.add(self._tag)
            self._wait_for_confirms()
        # Acked and routed rows are done; returned or nacked ones stay pending.
        done = [
            row.id
            for row, tag in zip(rows, tags, strict=True)
            if tag not in self._nacked and row.record_id not in self._returned
        ]
        return done, len(self._returned), len(self._nacked)

    def _wait_for_confirms(self) -> None:
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{len(self._unconfirmed)} publisher confirms did not arrive "
                    f"within {CONFIRM_TIMEOUT_S} s"
                )
            self._conn.connection.drain_events(timeout=remaining)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {t for t in self._unconfirmed if t > delivery_tag}
        else:
            self._unconfirmed.discard(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        nacked = (
            {t for t in self._unconfirmed if t <= delivery_tag}
            if multiple
            else {delivery_tag}
        )
        self._nacked |= nacked
        self._unconfirmed -= nacked

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        self._returned.add(message.properties.get("message_id"))

    # -- the connection -------------------------------------------------------

    def _connect(self) -> None:
        conn = Connection(
            self.amqp_uri,
            ssl=self.ssl,
            connect_timeout=CONNECT_TIMEOUT_S,
            heartbeat=HEARTBEAT_S,
        )
        try:
            conn.connect()
            channel = conn.connection.channel()
            channel.exchange_declare(
                USAGE_EXCHANGE.name,
                USAGE_EXCHANGE.type,
                durable=True,
                auto_delete=False,
                # A data centre's user may not declare it, only check it
                # (services/common/amqp.py, declare_shared_passively).
                passive=USAGE_EXCHANGE.passive,
            )
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
        except Exception:
            conn.release()
            raise
        self._conn, self._channel, self._tag = conn, channel, 0
        self._unconfirmed.clear()
        self.status.reachable()
        log.info("relay: connected to the broker")

    def _idle(self) -> None:
        """Nothing to publish: wait a little, keeping the connection's heartbeats."""
        if self._conn is None:
            self._stop.wait(self.poll_interval_s)
            return
        try:
            self._conn.drain_events(timeout=self.poll_interval_s)
        except TimeoutError:
            pass
        self._conn.heartbeat_check()

    def _disconnect(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        self._unconfirmed.clear()
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - the connection is gone either way
                pass
