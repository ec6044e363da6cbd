"""metering's nameko entrypoints: the usage consumer and its RPC.

The rules are in ``domain``, the storing in ``ingest``, the reads in
``reports``. A refused message is stored as a dead letter and acked; an
unexpected fault (database or registry down) requeues the message after a
short pause, so the consumer never stops and never spins.
"""

from __future__ import annotations

import contextlib
import logging

import eventlet
from nameko.messaging import Publisher
from nameko.rpc import ServiceRpc, rpc

from services.common.amqp import (
    FEDERATION_EXCHANGE,
    USAGE_EXCHANGE,
    RawMessage,
    consume_raw,
    durable_queue,
)
from services.common.db import Database
from services.common.errors import EXPECTED
from services.metering import ingest, reports
from services.metering.domain import Refused
from services.metering.registry import RegistryCache

log = logging.getLogger(__name__)

USAGE_QUEUE = durable_queue("metering.usage", USAGE_EXCHANGE, ["*.usage", "*.capacity"])
# How long a worker waits before handing back a message it could not process
# for a reason outside the message (a fault), so redelivery does not spin.
RETRY_BACKOFF_S = 1.0


class MeteringService:
    name = "metering"

    db = Database()
    city_registry_rpc = ServiceRpc("city_registry")
    registry_cache = RegistryCache()
    publish = Publisher(exchange=FEDERATION_EXCHANGE)

    @consume_raw(USAGE_QUEUE, requeue_on_error=True)
    def handle_usage_message(self, message: RawMessage) -> None:
        try:
            try:
                outgoing = ingest.process(
                    self.db, self.registry_cache(self.city_registry_rpc), message
                )
            except Refused as refused:
                log.info(
                    "dead letter %s from %s: %s",
                    refused.reason,
                    message.routing_key,
                    refused.detail_text[:200],
                )
                ingest.store_dead_letter(self.db, message, refused)
                return
            for event in outgoing:
                self.publish(
                    event.payload,
                    routing_key=event.routing_key,
                    message_id=event.event_id,
                )
        except Exception:
            log.exception("could not process %s; requeued", message.routing_key)
            with contextlib.suppress(Exception):  # the database may be the fault
                self.db.rollback()
            eventlet.sleep(RETRY_BACKOFF_S)
            raise

    @rpc(expected_exceptions=EXPECTED)
    def usage_overview(self, window_hours: int = 24) -> dict:
        return reports.usage_overview(self.db, window_hours)

    @rpc(expected_exceptions=EXPECTED)
    def list_dead_letters(
        self,
        datacenter_id: str | None = None,
        reason: str | None = None,
        limit: int = 100,
    ) -> list[dict]:
        return reports.list_dead_letters(self.db, datacenter_id, reason, limit)


def build(config: dict) -> type:
    """``services.common.runner`` entry: metering has one instance name."""
    return MeteringService
