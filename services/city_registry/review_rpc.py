"""The registry's RPC over cities' refusals and holds (a mixin of
``CityRegistryService``): the portal lists them beside metering's dead
letters, replays a refusal, and counts them per data centre and reason."""

from __future__ import annotations

from typing import Any

from services.city_registry.domain.views import timestamp
from services.common.errors import EXPECTED, InvalidRequest
from services.common.rpc_access import rpc
from services.common.units import parse_ts, utcnow

_MOMENTS = ("refused_at", "replayed_at", "held_at", "decided_at", "oldest_held_at")


def _wire(item: dict[str, Any]) -> dict[str, Any]:
    return {k: timestamp(v) if k in _MOMENTS else v for k, v in item.items()}


class ReviewEntrypoints:
    """National callers only (``RPC_CALLERS``); the portal confines a data
    centre to its own records."""

    @rpc(expected_exceptions=EXPECTED)
    def list_city_refusals(
        self,
        datacenter_id: str | None = None,
        city: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        """Records the cities refused, newest first: ``{"items", "total"}``."""
        items, total = self.store.city_refusals(
            datacenter_id, city, limit, offset, reason
        )
        return {"items": [_wire(item) for item in items], "total": total}

    @rpc(expected_exceptions=EXPECTED)
    def get_city_refusal(self, refusal_id: int) -> dict[str, Any]:
        return _wire(self.store.city_refusal(refusal_id))

    @rpc(expected_exceptions=EXPECTED)
    def mark_refusal_replayed(self, refusal_id: int) -> dict[str, Any]:
        """A replay was asked for: its outcome follows from the city's next
        event about the record (booked, held, refused again)."""
        self.store.city_refusal(refusal_id)  # NotFound
        return _wire(self.store.mark_replayed(refusal_id, utcnow()))

    @rpc(expected_exceptions=EXPECTED)
    def list_city_holds(
        self,
        datacenter_id: str | None = None,
        city: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        items, total = self.store.city_holds(datacenter_id, city, status, limit, offset)
        return {"items": [_wire(item) for item in items], "total": total}

    @rpc(expected_exceptions=EXPECTED)
    def city_refusal_counts(
        self, since: str, datacenter_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Refused and held records since ``since`` (ISO 8601), per data
        centre, kind (refused, held) and reason."""
        try:
            moment = parse_ts(since)
        except (TypeError, ValueError):
            raise InvalidRequest(
                "invalid_since", "since must be an ISO 8601 UTC time"
            ) from None
        return self.store.refusal_counts(moment, datacenter_id)

    @rpc(expected_exceptions=EXPECTED)
    def review_queues(self, city: str | None = None) -> list[dict[str, Any]]:
        """Per city (or only ``city``), the held records waiting for review:
        ``[{"city", "waiting", "subsidy_fen", "oldest_held_at"}]``."""
        return [_wire(queue) for queue in self.store.review_queues(city)]
