"""What the registry prunes, and when a row is old enough (issue 16 item 6).

- ``processed_events`` by ``processed_at`` (class ``processed_events``): the
  ids of federation events already applied, kept as long as a duplicate of
  one can still arrive (redelivery, a relay, a parked copy's replay);
- ``parked_events`` by ``parked_at`` (class ``dead_letters``).

The read model (cities, programs, vouchers, refusals, holds, clawbacks) and
the members' keys and tokens are the registry's state, not history: kept.
"""

from __future__ import annotations

from services.city_registry.models import ParkedEvent, ProcessedEvent
from services.common.retention import Target
from services.common.retention_entrypoints import retention_entrypoints


def targets() -> list[Target]:
    processed, parked = ProcessedEvent.__table__, ParkedEvent.__table__
    return [
        Target(
            processed,
            "processed_events",
            lambda cutoff: processed.c.processed_at < cutoff,
        ),
        Target(parked, "dead_letters", lambda cutoff: parked.c.parked_at < cutoff),
    ]


RegistryRetention = retention_entrypoints(targets)
