"""Bounded retries of the registry's federation consumer (issue 16), mixed
into ``CityRegistryService``; the parts every consumer shares (the table,
the counting, the RPC) are ``services/common/parking.py``'s.

An event is applied, or set aside with its reason in ``parked_events``, and
the queue goes on; nothing is requeued forever and nothing is dropped with
only a log line:

- rejected on arrival (not JSON, not the contract, a body naming another
  city than its routing key, a voucher prefix not the city's): parked at once
  as ``rejected``; no retry can make it valid;
- failing to apply for another reason (a value the database refuses, a bug):
  requeued, and parked as ``failed`` on its ``MAX_DELIVERY_ATTEMPTS``-th
  failure (default 5);
- the database unreachable (``OperationalError``, ``InterfaceError``, a pool
  timeout, a dropped connection): requeued without counting. An outage is
  not the event's fault, and parking needs the database too.

``list_parked_events`` and ``replay_parked_event`` (RPC, national) let an
operator see them and apply one again once its cause is fixed; the portal
(``GET /api/v1/parked-events``, ``POST …/<id>/replay``) and the CLI
(``computenet parked``) call them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from services.city_registry.domain import events
from services.common import parking
from services.common.amqp import RawMessage
from services.common.parking import (
    APPLIED,
    DUPLICATE,
    FAILED,
    PARKED_AGAIN,
    REJECTED,
    TRANSIENT,
    Attempts,
)
from services.common.units import utcnow

__all__ = [
    "APPLIED",
    "DUPLICATE",
    "FAILED",
    "MAX_ATTEMPTS",
    "PARKED_AGAIN",
    "REJECTED",
    "TRANSIENT",
    "Attempts",
    "ParkedEvents",
]

log = logging.getLogger(__name__)

# The default of MAX_DELIVERY_ATTEMPTS (the configuration may say otherwise).
MAX_ATTEMPTS = parking.DEFAULT_MAX_ATTEMPTS


class ParkedEvents(parking.ParkedEvents):
    """Needs the service's ``store``, ``projection_lock``, ``attempts`` and
    ``_assigned_prefix``."""

    @property
    def parking_store(self) -> Any:
        return self.store

    # A database outage is requeued after this pause, as metering's batch
    # consumer does, so the consumer does not spin through it: on a quorum
    # queue every requeue counts towards the broker's x-delivery-limit
    # (services/common/amqp.py), which must stay out of reach.
    outage_pause_s = 1.0

    def project_or_park(self, message: RawMessage) -> None:
        """Apply one federation event, or set it aside (module docstring)."""
        try:
            applied = self._project(message.routing_key, message.body)
        except events.RejectedEvent as exc:
            self.park(message, REJECTED, str(exc), attempts=1)
            return
        except Exception as exc:  # noqa: BLE001 - counted, then parked
            if parking.is_transient(exc):
                time.sleep(self.outage_pause_s)  # green in the service (eventlet)
                raise  # requeued; the database comes back
            attempts = self.count_failure(message)
            limit = parking.max_attempts()
            if attempts < limit:
                log.warning(
                    "federation event on %s failed (attempt %d of %d): %r",
                    message.routing_key,
                    attempts,
                    limit,
                    exc,
                )
                raise
            self.park(message, FAILED, parking.describe(exc), attempts)
            return
        self.forget_failures(message)
        if not applied:
            log.info("duplicate federation event on %s dropped", message.routing_key)

    def replay_parked(self, parked: dict[str, Any]) -> bool:
        return self._project(parked["routing_key"], parked["body"].encode())

    def _project(self, routing_key: str, body: bytes) -> bool:
        """Apply the event; False for a duplicate; RejectedEvent if invalid."""
        event, loaded = events.decode_event(routing_key, body)
        # The prefix is checked under the lock too: reading it may wait for
        # the database, and events must still be applied in delivery order.
        with self.projection_lock:
            events.check_voucher_prefix(
                event, loaded, self._assigned_prefix(loaded["city"])
            )
            return self.store.apply_event(event, loaded, utcnow())
