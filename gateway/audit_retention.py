"""Pruning the portal's audit log by the ``audit`` retention class (issue 16
item 6; services/common/retention.py).

The portal is a WSGI app, possibly many worker processes, with no timer of
its own: after a request, when ``interval_s`` has passed since this process
last pruned, one daemon thread prunes entries older than the retention,
in batches, while requests go on. At most one such thread per process; the
batches' ``SKIP LOCKED`` (PostgreSQL) keeps two processes pruning together
from waiting on each other, and their deletes are of the same old rows.

Only ``portal_audit_log`` is pruned: ``portal_refused_writes`` has one row per
endpoint and status, however many writes are refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flask import Flask, Response, current_app

from gateway.audit import AUDIT, AuditLog, audit_log
from services.common.retention import (
    Pruned,
    RetentionPolicy,
    Target,
    policy_from_config,
    prune_targets,
)

RETENTION_PRUNER = "audit_retention"  # key in app.extensions

log = logging.getLogger(__name__)


def targets() -> list[Target]:
    return [Target(audit_log, "audit", lambda cutoff: audit_log.c.at < cutoff)]


class AuditPruner:
    """Prunes the audit log at most once per ``policy.interval_s``."""

    def __init__(
        self,
        audit: AuditLog,
        policy: RetentionPolicy,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.audit = audit
        self.policy = policy
        self.clock = clock
        # The first prune one interval after start, as the services' timers.
        self._due = clock() + policy.interval_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def maybe_start(self) -> bool:
        """Start a prune in the background if one is due; whether it did."""
        if not self.policy.enabled or self.clock() < self._due:
            return False
        with self._lock:
            if self.clock() < self._due or (
                self._thread is not None and self._thread.is_alive()
            ):
                return False
            self._due = self.clock() + self.policy.interval_s
            self._thread = threading.Thread(
                target=self.prune_once, name="audit-retention", daemon=True
            )
            self._thread.start()
        return True

    def prune_once(self) -> list[Pruned]:
        try:
            return prune_targets(self.audit.engine, targets(), self.policy)
        except Exception:  # noqa: BLE001 - the next interval tries again
            log.exception("retention: pruning the audit log failed")
            return []

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def _after_request(response: Response) -> Response:
    current_app.extensions[RETENTION_PRUNER].maybe_start()
    return response


def init_app(app: Flask, config: dict) -> AuditPruner:
    """Install the pruner; a retention below its floor is a ``ConfigError``
    here, when the app is built."""
    pruner = AuditPruner(app.extensions[AUDIT], policy_from_config(config))
    app.extensions[RETENTION_PRUNER] = pruner
    app.after_request(_after_request)
    return pruner
