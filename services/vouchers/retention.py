"""What a city's voucher service prunes (issue 16 item 6): its ``outbox``
rows once published, ``published_at`` older than the ``outbox`` class.

An unpublished row is never pruned, whatever its age: the relay still owes
it to the bus. A published one is not read again: a redelivered record
re-publishes from its redemptions, and a fact written again after its row
is gone is published again under the same event id, which the registry
drops by ``processed_events`` (kept far longer, see
``services.common.retention``). The ledger, redemptions, refusals, holds,
decisions and binding changes are the city's books: kept.
"""

from __future__ import annotations

from services.common.retention import Target
from services.common.retention_entrypoints import retention_entrypoints
from services.vouchers.models import OutboxEvent


def targets() -> list[Target]:
    outbox = OutboxEvent.__table__
    return [
        Target(
            outbox,
            "outbox",
            lambda cutoff: (
                outbox.c.published_at.is_not(None) & (outbox.c.published_at < cutoff)
            ),
        )
    ]


VouchersRetention = retention_entrypoints(targets)
