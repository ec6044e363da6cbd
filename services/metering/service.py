"""metering's nameko entrypoints: the batch usage consumer and its RPC.

The rules are in ``domain``, the storing in ``ingest``, the reads in
``reports``, the batch consumer and confirmed publisher in ``batching``.
Deliveries are handled in batches: one transaction stores a batch's records,
rollups and dead letters, its ``usage_rated`` events are published with
confirms, then the deliveries are acked. A refused message is a dead letter
in that transaction; an unexpected fault (database or registry down) requeues
the batch after a short pause, so the consumer never stops and never spins.
"""

from __future__ import annotations

import logging

from nameko.rpc import ServiceRpc, rpc

from services.common.amqp import FEDERATION_EXCHANGE, USAGE_EXCHANGE, durable_queue
from services.common.db import Database
from services.common.errors import EXPECTED
from services.metering import ingest, reports
from services.metering.batching import ConfirmedPublisher, consume_batch
from services.metering.registry import RegistryCache

log = logging.getLogger(__name__)

USAGE_QUEUE = durable_queue("metering.usage", USAGE_EXCHANGE, ["*.usage", "*.capacity"])


class MeteringService:
    name = "metering"

    db = Database()
    city_registry_rpc = ServiceRpc("city_registry")
    registry_cache = RegistryCache()
    publish = ConfirmedPublisher(FEDERATION_EXCHANGE)

    @consume_batch(USAGE_QUEUE)
    def handle_usage_batch(self, messages: list) -> list[int]:
        """Store a batch, publish its events; returns the indices to requeue."""
        registry = self.registry_cache(self.city_registry_rpc)
        try:
            self._apply(registry, messages)
            return []
        except Exception:
            if len(messages) == 1:
                raise
            log.exception("batch of %d failed; retrying one by one", len(messages))
        # A batch fails as a whole; alone, each message either goes through
        # or is the one that fails (and only it is requeued).
        requeue = []
        for index, message in enumerate(messages):
            try:
                self._apply(registry, [message])
            except Exception:
                log.exception("could not process %s; requeued", message.routing_key)
                requeue.append(index)
        return requeue

    def _apply(self, registry, messages: list) -> ingest.BatchOutcome:
        outcome = ingest.process_batch(self.db, registry, messages)
        for index, refused in outcome.refused:
            log.info(
                "dead letter %s from %s: %s",
                refused.reason,
                messages[index].routing_key[:255],
                refused.detail_text[:200],
            )
        self.publish(
            (event.routing_key, event.event_id, event.payload)
            for event in outcome.outgoing
        )
        return outcome

    @rpc(expected_exceptions=EXPECTED)
    def usage_overview(self, window_hours: int = 24) -> dict:
        return reports.usage_overview(self.db, window_hours)

    @rpc(expected_exceptions=EXPECTED)
    def usage_figures(self) -> dict:
        """Per data centre and per hub region, over the last 24 h and 7 days."""
        return reports.usage_figures(self.db)

    @rpc(expected_exceptions=EXPECTED)
    def usage_by_tenant(self, datacenter_id: str, window_hours: int = 24) -> list:
        return reports.usage_by_tenant(self.db, datacenter_id, window_hours)

    @rpc(expected_exceptions=EXPECTED)
    def usage_by_hour(self, datacenter_id: str, window_hours: int = 24) -> list:
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
        registry = self.registry_cache(self.city_registry_rpc)
        result, outgoing = reports.replay_dead_letter(self.db, registry, dead_letter_id)
        self.publish((e.routing_key, e.event_id, e.payload) for e in outgoing)
        return result


def build(config: dict) -> type:
    """``services.common.runner`` entry: metering has one instance name."""
    return MeteringService
