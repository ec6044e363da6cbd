"""Bounded retries of the city's usage queue (issue 16), mixed into
``VouchersService``; what every consumer shares (the table, the counting,
the RPC) is ``services/common/parking.py``'s.

The queue carries ``usage_rated``, ``binding_requested`` and ``usage_hold``.
Before, a batch that raised was requeued whole, forever: one record the
database refuses stalled every booking behind it; and a malformed message
was dropped with a log line. Now:

- a message not of the contract (not JSON, not its schema) is parked at
  once as ``rejected`` with its reason (``schema: …``): no retry can make
  it valid;
- a batch is booked in one transaction, as before. If that raises, its
  messages are booked one by one, each in its own transaction: the good
  ones go through, the failing one is counted and requeued alone, and on
  its ``MAX_DELIVERY_ATTEMPTS``-th failure (default 5) parked as ``failed``
  and acked; the stream goes on;
- a fault of the database itself (unreachable, a dropped connection) is
  not the messages': the batch is requeued whole, uncounted, as ever.

Acks still follow commits and confirms: the worker returns the confirmation
of the events of what it booked, or a ``Requeue`` of the messages to try
again with that confirmation (``services/common/batching.py``); the
consumer acks nothing before the broker has the events.

``list_parked_events`` and ``replay_parked_event`` (RPC; the portal lets the
ministry and the city's own admin call them) list the parked messages and
apply one again once its cause is fixed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError

from services.common import parking
from services.common.amqp import RawMessage, federation_key
from services.common.batching import Requeue
from services.common.contracts import EVENT_SCHEMAS, fast_load_usage_rated
from services.common.parking import FAILED, REJECTED
from services.common.units import format_ts, utcnow
from services.vouchers.binding_entrypoints import (
    BINDING_REQUESTED,
    load_binding_request,
)
from services.vouchers.review_rpc import USAGE_HOLD, is_hold, load_hold

log = logging.getLogger(__name__)

USAGE_RATED = "usage_rated"
_USAGE_RATED = EVENT_SCHEMAS[USAGE_RATED]()
# How long a replay waits for the broker to confirm what it published.
REPLAY_CONFIRM_S = 10.0


@dataclass(slots=True)
class Decoded:
    """A message of the usage queue, loaded: which event, and its body."""

    index: int
    message: RawMessage
    event: str  # usage_rated | binding_requested | usage_hold
    body: dict[str, Any]


@dataclass(slots=True)
class Applied:
    """What applying some messages came to: the ``voucher_redeemed`` events
    to publish, the outbox rows to publish with them, and whether any was
    new (a replay of a record booked since is a duplicate)."""

    events: list
    rows: list
    new: bool


def load_usage_rated(message: RawMessage) -> dict[str, Any]:
    body = json.loads(message.body)
    # The schema only for what the fast path leaves to it.
    return fast_load_usage_rated(body) or _USAGE_RATED.load(body)


class UsageQueueParking(parking.ParkedEvents):
    """Needs the service's ``ledger``, ``attempts``, ``city``,
    ``apply_binding_requests``, ``apply_holds``, ``publish_with_outbox``."""

    @property
    def parking_store(self) -> Any:
        return self.ledger

    def book_or_park(self, messages: list[RawMessage]) -> Any:
        """A batch of the usage queue: booked, or booked one by one, or set
        aside (module docstring); the confirmation of its events, a
        ``Requeue``, or None (nothing to publish)."""
        decoded, malformed = [], []
        for index, message in enumerate(messages):
            try:
                decoded.append(self._decode(index, message))
            except (ValueError, TypeError, ValidationError) as err:
                detail = getattr(err, "messages", None) or str(err)
                malformed.append((message, f"schema: {detail}"))
        result = None
        if len(decoded) > 1:
            try:
                result = self._publish_applied(self._apply(decoded))
            except Exception as exc:
                if parking.is_transient(exc):
                    raise  # the database is away: the batch again, uncounted
                log.warning(
                    "batch of %d failed (%r); booking it one by one", len(decoded), exc
                )
                result = self._one_by_one(decoded)
            else:
                for item in decoded:
                    if item.message.redelivered:
                        self.forget_failures(item.message)
        elif decoded:
            result = self._one_by_one(decoded)
        # After the bookings: were the database away, they would have failed
        # first, and the batch would come again (its parked ones with it).
        for message, reason in malformed:
            self.park(message, REJECTED, reason, attempts=1)
        return result

    def _decode(self, index: int, message: RawMessage) -> Decoded:
        if message.routing_key == federation_key(self.city, BINDING_REQUESTED):
            return Decoded(
                index, message, BINDING_REQUESTED, load_binding_request(message)
            )
        if is_hold(message):
            return Decoded(index, message, USAGE_HOLD, load_hold(message))
        return Decoded(index, message, USAGE_RATED, load_usage_rated(message))

    def _apply(self, items: list[Decoded]) -> Applied:
        """Binding requests first (one transaction), the records (one), then
        the holds metering sent after their records (one each), so that a
        hold in the batch finds its record booked."""
        self.apply_binding_requests(
            [item.body for item in items if item.event == BINDING_REQUESTED]
        )
        records = [item.body for item in items if item.event == USAGE_RATED]
        events, rows, new = [], [], len(records) < len(items)
        if records:
            outcomes = self.ledger.book_usage_batch(records)
            key = federation_key(self.city, "voucher_redeemed")
            occurred_at = format_ts(utcnow())
            for record, outcome in zip(records, outcomes, strict=True):
                new = new or not outcome.duplicate
                if outcome.rejected is not None and not outcome.duplicate:
                    log.info(
                        "usage %s/%s not booked: %s",
                        record["datacenter_id"],
                        record["record_id"],
                        outcome.rejected,
                    )
                events.extend(
                    (key, row.event_id, redeemed_body(self.city, row, occurred_at))
                    for row in outcome.redemptions
                )
            # Refusals and holds (outbox rows).
            rows = [row for outcome in outcomes for row in outcome.events]
        rows += self.apply_holds(
            [item.body for item in items if item.event == USAGE_HOLD]
        )
        return Applied(events, rows, new)

    def _publish_applied(self, applied: Applied) -> Any:
        if not applied.events and not applied.rows:
            return None
        return self.publish_with_outbox(applied.events, applied.rows)

    def _one_by_one(self, items: list[Decoded]) -> Any:
        """Each message in its own transaction; the events of the good ones
        in one confirmed publish; the failing ones requeued (counted) or,
        on their last attempt, parked."""
        done = Applied([], [], False)
        requeue: set[int] = set()
        for n, item in enumerate(items):
            try:
                applied = self._apply([item])
            except Exception as exc:
                if parking.is_transient(exc):
                    if n == 0:
                        raise  # nothing done: the batch again, as a whole
                    # The database went away: this one and the rest again.
                    requeue.update(rest.index for rest in items[n:])
                    break
                if not self._counted_or_parked(item.message, exc):
                    requeue.add(item.index)
                continue
            if item.message.redelivered:
                self.forget_failures(item.message)
            done.events += applied.events
            done.rows += applied.rows
        confirmation = self._publish_applied(done)
        if requeue:
            return Requeue(frozenset(requeue), confirmation)
        return confirmation

    def _counted_or_parked(self, message: RawMessage, exc: Exception) -> bool:
        """One more failure of ``message``; True if it is parked now (ack
        it), False to requeue it."""
        attempts = self.count_failure(message)
        limit = parking.max_attempts()
        if attempts < limit:
            log.warning(
                "%s failed on its own (attempt %d of %d): %r",
                message.routing_key[:255],
                attempts,
                limit,
                exc,
            )
            return False
        try:
            self.park(message, FAILED, parking.describe(exc), attempts)
        except Exception:  # noqa: BLE001 - it stays on the queue, not lost
            log.exception("could not park a failing message; requeued")
            return False
        return True

    def replay_parked(self, parked: dict[str, Any]) -> bool:
        """Apply a parked message again, alone, and publish its events; a
        body still not of the contract, or still failing, raises (it stays
        parked, with the new reason)."""
        message = RawMessage(
            body=parked["body"].encode(),
            headers={},
            properties={},
            routing_key=parked["routing_key"],
            redelivered=True,
        )
        try:
            item = self._decode(0, message)
        except ValidationError as err:
            raise ValueError(f"schema: {err.messages}") from None
        applied = self._apply([item])
        confirmation = self._publish_applied(applied)
        if confirmation is not None:
            # The operator is answered once the broker has the events (the
            # outbox relays the rows' if not; voucher_redeemed is booked and
            # reconciled either way).
            confirmation.wait(REPLAY_CONFIRM_S)
        return applied.new


def redeemed_body(city: str, row, occurred_at: str) -> dict[str, Any]:
    """The ``voucher_redeemed`` event of one redemption row, as the schema
    dumps it (a property test holds them equal): dumping through the schema
    took about 5 % of the consumer's time, for fields that are plain strings
    and ints already."""
    return {
        "event_id": row.event_id,
        "city": city,
        "occurred_at": occurred_at,
        "voucher_code": row.voucher_code,
        "program_id": row.program_id,
        "record_id": row.record_id,
        "datacenter_id": row.datacenter_id,
        "gpu_seconds": row.gpu_seconds,
        "cost_fen": row.cost_fen,
        "subsidy_fen": row.subsidy_fen,
    }
