"""Bounded retries, for every consumer (issue 16): an event a consumer cannot
apply is set aside with its reason in its service's ``parked_events`` table,
for an operator to list and replay, and the queue goes on. Nothing is
requeued forever (one poison message would stall everything behind it) and
nothing is dropped with only a log line.

Shared by the registry (``services/city_registry/parking.py``), the cities
(``services/vouchers/parking.py``) and metering (``services/metering/parking.py``);
each says what applying and replaying an event means for it. Here:

- ``parking_store``: the table, the same in every service's own database,
  and the store that writes, lists and marks parked events;
- :class:`Attempts` and :func:`count_failure`: how often a message failed —
  the broker's ``x-delivery-count`` where it counts (quorum queues), else
  this process's own count of the same routing key and body;
- :func:`is_transient`: a fault of the database (unreachable, a pool
  timeout, a connection dropped), not of the event: retried without
  counting, since parking needs the database too;
- :class:`ParkedEvents`: the entrypoints' side, ``park`` and the two RPC
  methods ``list_parked_events`` and ``replay_parked_event``.

The kinds: ``rejected`` (could never be applied: not JSON, not the contract;
parked at once) and ``failed`` (failed ``MAX_DELIVERY_ATTEMPTS`` times).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from cachetools import TTLCache
from nameko import config
from nameko.extensions import DependencyProvider
from sqlalchemy import exc as sa_exc

from services.common.amqp import RawMessage
from services.common.errors import EXPECTED, Conflict, InvalidRequest
from services.common.parking_store import KINDS, wire
from services.common.rpc_access import rpc
from services.common.units import utcnow

log = logging.getLogger(__name__)

# Config key: attempts before a failing message is parked (every consumer).
MAX_DELIVERY_ATTEMPTS = "MAX_DELIVERY_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 5
REJECTED, FAILED = "rejected", "failed"
APPLIED, DUPLICATE, PARKED_AGAIN = "applied", "duplicate", "parked_again"
# Faults of the database, not of the event: retried without counting.
TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def max_attempts() -> int:
    """``MAX_DELIVERY_ATTEMPTS`` of the configuration, else 5."""
    return int(config.get(MAX_DELIVERY_ATTEMPTS) or DEFAULT_MAX_ATTEMPTS)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is the database's fault: unreachable, a pool timeout,
    or any DBAPI error that invalidated its connection (a disconnect)."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def describe(exc: BaseException) -> str:
    """The reason kept for a failure: the exception's type and message."""
    return f"{type(exc).__name__}: {exc}"


# -- counting ---------------------------------------------------------------------


class Attempts(DependencyProvider):
    """Failures per message in this process (an hour's memory, bounded)."""

    def setup(self) -> None:
        self.counts: TTLCache = TTLCache(maxsize=10_000, ttl=3600)

    def get_dependency(self, worker_ctx: Any) -> TTLCache:
        return self.counts


def message_key(message: RawMessage) -> str:
    """What identifies a message across redeliveries: routing key and body
    (a message id is the publisher's choice, and not always set)."""
    return hashlib.sha256(
        message.routing_key.encode("utf-8", "replace") + b"\0" + message.body
    ).hexdigest()


def count_failure(counts: TTLCache, message: RawMessage) -> int:
    """One more failure of ``message``: its attempts so far, this one
    included, as the broker counts them (a quorum queue's
    ``x-delivery-count``, the deliveries before this one) or as this process
    does, whichever is more."""
    key = message_key(message)
    mine = counts.get(key, 0) + 1
    counts[key] = mine
    counted = (message.headers or {}).get("x-delivery-count")
    by_broker = counted + 1 if isinstance(counted, int) else 0
    return max(mine, by_broker)


def event_id_of(body: bytes | str) -> str | None:
    """The event's id when the body names one (for the operator's search)."""
    try:
        value = json.loads(body).get("event_id")
    except (ValueError, AttributeError, TypeError):
        return None
    return value if isinstance(value, str) else None


# -- the entrypoints' side --------------------------------------------------------


class ParkedEvents:
    """``park`` and the RPC of parked events, mixed into a service.

    Needs ``attempts`` (an :class:`Attempts`) and, from the service:
    ``parking_store`` (a :class:`ParkingStore`, or anything with its four
    methods) and ``replay_parked(parked)`` (apply a parked event again: True
    if it was applied, False if it was a duplicate, raises if it fails).
    ``parked_extra(message)`` gives the model's own columns (none here).
    """

    attempts: Any
    parking_store: Any

    def replay_parked(self, parked: dict[str, Any]) -> bool:
        raise NotImplementedError

    def parked_extra(self, message: RawMessage) -> dict[str, Any]:
        return {}

    def count_failure(self, message: RawMessage) -> int:
        return count_failure(self.attempts, message)

    def forget_failures(self, message: RawMessage) -> None:
        """It went through: its count starts again."""
        self.attempts.pop(message_key(message), None)

    def park(self, message: RawMessage, kind: str, reason: str, attempts: int) -> int:
        """Set ``message`` aside (the caller then acks it); its parked id."""
        extra = self.parked_extra(message)
        parked_id = self.parking_store.park(
            message.routing_key,
            message.body,
            event_id_of(message.body),
            kind,
            reason,
            attempts,
            utcnow(),
            **extra,
        )
        self.forget_failures(message)
        log.error(
            "event on %s parked as %s (#%d) after %d attempt(s): %s",
            message.routing_key[:255],
            kind,
            parked_id,
            attempts,
            reason[:300],
        )
        return parked_id

    @rpc(expected_exceptions=EXPECTED)
    def list_parked_events(
        self, kind: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        """Events set aside, newest first (``kind`` rejected | failed)."""
        if kind is not None and kind not in KINDS:
            raise InvalidRequest("invalid_request", f"kind must be one of {KINDS}")
        items, total = self.parking_store.parked_events(kind, limit, offset)
        return {"items": [wire(item) for item in items], "total": total}

    @rpc(expected_exceptions=EXPECTED)
    def replay_parked_event(self, parked_id: int) -> dict[str, Any]:
        """Apply a parked event again, once; ``outcome`` applied, duplicate
        (it had been applied since) or parked_again (still failing: the
        event stays listed, and the new reason is answered as ``reason``)."""
        parked = self.parking_store.parked_event(parked_id)
        if parked["replayed_at"] is not None and parked["outcome"] != PARKED_AGAIN:
            raise Conflict(
                "already_replayed", f"parked event {parked_id} was replayed already"
            )
        reason = None
        try:
            outcome = APPLIED if self.replay_parked(parked) else DUPLICATE
        except Exception as exc:  # noqa: BLE001 - told to the operator
            if is_transient(exc):
                raise  # the database is away: nothing was decided
            outcome, reason = PARKED_AGAIN, describe(exc)
        self.parking_store.mark_parked_replayed(parked_id, outcome, utcnow())
        return {"id": parked_id, "outcome": outcome, "reason": reason}
