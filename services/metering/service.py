"""metering's nameko entrypoints: the batch usage consumer and its RPC.

The rules are in ``domain``, a batch's checks and storing in ``ingest`` (its
SQL in ``store``, ``capacity`` and ``dead_letters``), the reads in
``reports``, the batch consumer's policy in ``batching`` (the consumer and the
confirmed publisher are ``services.common.batching``'s).
Deliveries are handled in batches: one transaction stores a batch's records,
rollups and dead letters, its ``usage_rated`` events are published with
confirms, then the deliveries are acked. A refused message is a dead letter
in that transaction; an unexpected fault (database or registry down) requeues
the batch after a short pause, so the consumer never stops and never spins;
a message failing alone ``MAX_DELIVERY_ATTEMPTS`` times is parked (``parking``).
Binding requests (``<dc>.binding``) have their consumer in ``bindings``.
"""

from __future__ import annotations

import logging

from nameko import config

import services.common.remote_errors  # noqa: F401 - errors cross RPC as themselves
from services.common import parking
from services.common.amqp import FEDERATION_EXCHANGE, USAGE_EXCHANGE, durable_queue
from services.common.db import Database
from services.common.errors import EXPECTED, Unavailable
from services.common.publishing import ConfirmedPublisher, Unroutable
from services.common.rpc_access import ServiceRpc, rpc
from services.metering import dead_letters, ingest, integrity, replay_rated, reports
from services.metering.batching import consume_batch
from services.metering.bindings import BindingRequests
from services.metering.parking import MeteringParking
from services.metering.registry import RegistryCache
from services.metering.retention import MeteringRetention

log = logging.getLogger(__name__)

# A message that fails this many times on its own is parked (issue 16).
MAX_DELIVERY_ATTEMPTS = parking.MAX_DELIVERY_ATTEMPTS
DEFAULT_MAX_DELIVERY_ATTEMPTS = parking.DEFAULT_MAX_ATTEMPTS

USAGE_QUEUE = durable_queue("metering.usage", USAGE_EXCHANGE, ["*.usage", "*.capacity"])


class MeteringService(MeteringRetention, BindingRequests, MeteringParking):
    """Usage and capacity (here), data centres' binding requests, the
    parked messages and retention (the mixins)."""

    name = "metering"

    db = Database()
    city_registry_rpc = ServiceRpc("city_registry")
    registry_cache = RegistryCache()
    # mandatory: a usage_rated no city queue is bound for is an error, never
    # confirmed and dropped (the registry declares each city's queue).
    publish = ConfirmedPublisher(FEDERATION_EXCHANGE, mandatory=True)

    @consume_batch(USAGE_QUEUE)
    def handle_usage_batch(self, messages: list) -> list[int]:
        """Store a batch, publish its events; returns the indices to requeue."""
        registry = self.registry_cache(self.city_registry_rpc)
        if len(messages) > 1:
            try:
                self._publish(self._store(registry, messages))
                return []
            except Exception:
                log.exception("batch of %d failed; retrying one by one", len(messages))
        # A batch fails as a whole; alone, each message either goes through
        # or is the one that fails (and only it is requeued, or parked once
        # it has failed MAX_DELIVERY_ATTEMPTS times).
        return [
            index
            for index, message in enumerate(messages)
            if not self._apply_alone(registry, message)
        ]

    def _apply_alone(self, registry, message) -> bool:
        """One message on its own; False: requeue it."""
        try:
            outcome = self._store(registry, [message])
        except Unavailable:  # the registry is down: nothing wrong with the message
            log.exception("could not process %s; requeued", message.routing_key)
            return False
        except Exception as exc:
            log.exception("could not process %s", message.routing_key)
            if parking.is_transient(exc):
                return False  # the database's fault, not the message's: uncounted
            return self._count_failure(message, exc)
        try:
            # Its effects are committed; a failure to announce them is the
            # broker's, never the message's: requeued, not counted ...
            self._publish(outcome)
        except Unroutable as exc:
            # ... unless no queue takes them: that will not pass by itself.
            # Counted, it ends as a dead letter naming the routing keys; a
            # replay once the city's queue exists announces it again.
            log.error("the events of %s are unroutable: %s", message.routing_key, exc)
            return self._count_failure(message, exc)
        except Exception:
            log.exception("could not publish the events of %s", message.routing_key)
            return False
        if message.redelivered:
            try:
                dead_letters.forget_failures(self.db, message)
            except Exception:  # noqa: BLE001 - only a counter left behind
                log.warning("could not clear the failures of a message", exc_info=True)
        return True

    def _count_failure(self, message, exc: BaseException) -> bool:
        """One more failed attempt; True (ack) once it is parked."""
        try:
            exhausted = dead_letters.record_failure(
                self.db, message, exc, self.max_attempts
            )
        except Exception:
            log.exception("could not count the failure; requeued")
            return False
        if exhausted:
            log.error(
                "%s parked after %d attempts",
                message.routing_key[:255],
                self.max_attempts,
            )
        return exhausted

    @property
    def max_attempts(self) -> int:
        return int(config.get(MAX_DELIVERY_ATTEMPTS) or DEFAULT_MAX_DELIVERY_ATTEMPTS)

    def _store(self, registry, messages: list) -> ingest.BatchOutcome:
        outcome = ingest.process_batch(self.db, registry, messages)
        for index, refused in outcome.refused:
            log.info(
                "dead letter %s from %s: %s",
                refused.reason,
                messages[index].routing_key[:255],
                refused.detail_text[:200],
            )
        return outcome

    def _publish(self, outcome: ingest.BatchOutcome) -> None:
        self.publish(
            (event.routing_key, event.event_id, event.body)
            for event in outcome.outgoing
        )

    @rpc(expected_exceptions=EXPECTED)
    def usage_overview(self, window_hours: int = 24) -> dict:
        return reports.usage_overview(self.db, window_hours)

    @rpc(expected_exceptions=EXPECTED)
    def usage_figures(self) -> dict:
        """Per data centre and per hub region, over the last 24 h and 7 days."""
        return reports.usage_figures(self.db)

    @rpc(expected_exceptions=EXPECTED)
    def integrity_counts(self) -> dict:
        """Records rated and dead letters by reason, per data centre, over
        the last 24 h and 7 days (the integrity page)."""
        return integrity.integrity_counts(self.db)

    @rpc(expected_exceptions=EXPECTED)
    def usage_by_tenant(self, datacenter_id: str, window_hours: int = 24) -> list:
        return reports.usage_by_tenant(self.db, datacenter_id, window_hours)

    @rpc(expected_exceptions=EXPECTED)
    def usage_by_hour(self, datacenter_id: str | None, window_hours: int = 24) -> list:
        """Per hour; ``datacenter_id`` None sums the whole network."""
        return reports.usage_by_hour(self.db, datacenter_id, window_hours)

    @rpc(expected_exceptions=EXPECTED)
    def list_dead_letters(
        self,
        datacenter_id: str | None = None,
        reason: str | None = None,
        limit: int = 100,
    ) -> list[dict]:
        return reports.list_dead_letters(self.db, datacenter_id, reason, limit)

    @rpc(expected_exceptions=EXPECTED)
    def replay_dead_letter(self, dead_letter_id: int) -> dict:
        """Run a dead letter through every rule again (its cause fixed)."""
        replayed = self.replay_binding_letter(dead_letter_id)
        if replayed is not None:
            return replayed
        registry = self.registry_cache(self.city_registry_rpc)
        result, outgoing = reports.replay_dead_letter(self.db, registry, dead_letter_id)
        self.publish((e.routing_key, e.event_id, e.body) for e in outgoing)
        return result

    @rpc(expected_exceptions=EXPECTED)
    def replay_rated(self, datacenter_id: str, record_id: str) -> dict:
        """Send a stored record to its city again, ``replay: true`` (the city
        decides its refusal again): the replay of a city's refusal."""
        result, outgoing = replay_rated.replay_rated(self.db, datacenter_id, record_id)
        self.publish((e.routing_key, e.event_id, e.body) for e in outgoing)
        return result


def build(config: dict) -> type:
    """``services.common.runner`` entry: metering has one instance name."""
    return MeteringService
