"""The relay: publishes the outbox to ``computenet.usage``, signed, with confirms.

It owns its retry loop (DESIGN.md §3): on any broker error it logs one line,
backs off (0.5 s doubling to 30 s), reconnects and resumes by itself. A row is
marked published only after the broker confirmed it *and* routed it to a queue
(``mandatory``): a record is never dropped, at worst published twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime

from kombu import Connection, Producer

from services.common import telemetry
from services.common.amqp import USAGE_EXCHANGE, usage_key
from services.common.units import utcnow
from services.datacenter_gateway import domain
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


def open_producer(amqp_uri: str, on_return=None) -> tuple[Connection, Producer]:
    """A connection with publisher confirms; its producer declared the exchange."""
    conn = Connection(
        amqp_uri,
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
    mandatory: bool = False,
) -> None:
    """One message of CONTRACTS.md §1/§2: exact bytes, signed, persistent, confirmed."""
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
        retry=False,
        timeout=CONFIRM_TIMEOUT_S,
        confirm_timeout=CONFIRM_TIMEOUT_S,
    )


class Relay:
    """Publishes unpublished outbox rows in order, in batches, until stopped."""

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
    ):
        self.outbox = outbox
        self.amqp_uri = amqp_uri
        self.datacenter_id = datacenter_id
        self.routing_key = usage_key(datacenter_id)
        self.key_id = key_id
        self.secret = secret
        self.batch_size = max(1, int(batch_size))
        self.status = status or RelayStatus()
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self._producer: Producer | None = None
        self._returned: set[str] = set()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run(self) -> None:
        backoff = domain.Backoff()
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
        """Publish up to one batch; returns how many rows are now published."""
        rows = self.outbox.pending(self.batch_size)
        if not rows:
            return 0
        if self._producer is None:
            self._connect()
        self._returned.clear()
        sent: list[PendingRow] = []
        try:
            for row in rows:
                self._publish(row)
                sent.append(row)
        finally:
            # Whatever the broker confirmed is marked, even if a later message
            # of the batch failed: fewer duplicates after a reconnect.
            done = [row.id for row in sent if row.record_id not in self._returned]
            self.outbox.mark_published(done)
            if done:
                self.status.confirmed(len(done))
        if self._returned:
            raise Unroutable(
                f"{len(self._returned)} records returned unroutable: no queue bound to "
                f"{USAGE_EXCHANGE.name} for {self.routing_key!r} (is metering running?)"
            )
        return len(done)

    def _publish(self, row: PendingRow) -> None:
        context = (
            telemetry.extract({"traceparent": row.traceparent})
            if row.traceparent
            else None
        )
        with telemetry.tracer.start_as_current_span(
            "datacenter_gateway.publish", context=context
        ) as span:
            span.set_attribute("computenet.record_id", row.record_id)
            publish_signed(
                self._producer,
                row.body,
                self.routing_key,
                row.record_id,
                self.key_id,
                self.secret,
                mandatory=True,
            )

    # -- the connection -------------------------------------------------------

    def _connect(self) -> None:
        self._conn, self._producer = open_producer(
            self.amqp_uri, on_return=self._on_return
        )
        self.status.reachable()
        log.info("relay: connected to the broker")

    def _on_return(self, exc, exchange, routing_key, message) -> None:
        self._returned.add(message.properties.get("message_id"))

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
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - the connection is gone either way
                pass
