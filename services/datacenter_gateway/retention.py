"""What the data-centre gateway prunes (issue 16 item 6): outbox rows the
broker confirmed (``published_at`` set) longer ago than the ``outbox``
class, once their span has ended that long ago too.

Never an unpublished row, whatever its age (the relay still owes it to the
bus), nor one whose span is recent (the capacity report counts the GPUs of
the records running now). A pruned row's ``record_id`` no longer makes an
agent's retry of the same POST a duplicate here: it is stored and published
again, and metering, which keeps every ``record_id`` forever, drops it.

Binding requests (one per hand-over, a few per tenant) are kept: the latest
of a tenant tells a repeated hand-over from a new one.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from services.common.retention import RetentionPolicy, Target, prune_targets
from services.datacenter_gateway.background import BackgroundLoop
from services.datacenter_gateway.outbox import OutboxRecord

log = logging.getLogger("computenet.datacenter_gateway.retention")


def targets() -> list[Target]:
    records = OutboxRecord.__table__
    return [
        Target(
            records,
            "outbox",
            lambda cutoff: (
                records.c.published_at.is_not(None)
                & (records.c.published_at < cutoff)
                & (records.c.ended_at < cutoff)
            ),
        )
    ]


class OutboxPruner(BackgroundLoop):
    """Prunes the outbox every ``policy.interval_s``, in its own thread."""

    thread_name = "retention"

    def __init__(self, engine: Engine, policy: RetentionPolicy):
        self.engine = engine
        self.policy = policy
        super().__init__()

    def run(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            self.prune_once()

    def prune_once(self) -> int:
        """Rows pruned; a failure is logged and retried next interval."""
        try:
            pruned = prune_targets(self.engine, targets(), self.policy)
            return sum(p.rows for p in pruned)
        except Exception:  # noqa: BLE001 - the next interval tries again
            log.exception("retention: pruning the outbox failed")
            return 0
