"""Retention in a nameko service: a timer that prunes the service's tables by
the ``RETENTION`` policy (services/common/retention.py).

A service opts in with one base class, so that its ``service.py`` changes by
a line::

    class MeteringService(retention_entrypoints(metering_targets), …):

The policy is read and checked in ``setup()``, so a retention below a floor
stops the service at start (a ``ConfigError``), not at the first prune. The
pruner has its own engine (one connection): a prune never takes a connection
from the workers' pool, and the workers' sessions never see its transactions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nameko import config
from nameko.extensions import DependencyProvider
from nameko.timer import Timer
from sqlalchemy import Engine

from services.common.config import DATABASE_URL
from services.common.db import make_engine
from services.common.retention import (
    DEFAULT_INTERVAL_S,
    Pruned,
    RetentionPolicy,
    Target,
    policy_from_config,
    prune_targets,
)

log = logging.getLogger(__name__)


class RetentionTimer(Timer):
    """A nameko ``Timer`` whose interval is the policy's ``interval_s``.

    ``timer(interval=…)`` fixes the interval when the class is defined; this
    one reads it from the configuration when the container sets it up. Not
    eager: a service starting does its work before it prunes.
    """

    def __init__(self, **kwargs):
        super().__init__(interval=DEFAULT_INTERVAL_S, eager=False, **kwargs)

    def setup(self):
        self.interval = policy_from_config(config).interval_s
        super().setup()


class Pruner:
    """What the dependency injects: ``run()`` prunes every target once."""

    def __init__(self, engine: Engine, targets: list[Target], policy: RetentionPolicy):
        self.engine = engine
        self.targets = targets
        self.policy = policy

    def run(self) -> list[Pruned]:
        return prune_targets(self.engine, self.targets, self.policy)


class Retention(DependencyProvider):
    """Injects a :class:`Pruner` over ``targets()`` (a function, so that the
    tables are imported only by the service that prunes them)."""

    def __init__(self, targets: Callable[[], list[Target]]):
        self.targets = targets
        self.engine: Engine | None = None
        self.policy: RetentionPolicy | None = None

    def setup(self):
        self.policy = policy_from_config(config)
        self.engine = make_engine(config[DATABASE_URL], pool_size=1, max_overflow=0)

    def stop(self):
        if self.engine is not None:
            self.engine.dispose()

    def get_dependency(self, worker_ctx) -> Pruner:
        return Pruner(self.engine, self.targets(), self.policy)


def retention_entrypoints(targets: Callable[[], list[Target]]) -> type:
    """A mixin with the ``retention`` dependency and the ``prune_retention``
    timer over ``targets()``, for a service class to inherit."""

    class RetentionEntrypoints:
        retention = Retention(targets)

        @RetentionTimer.decorator
        def prune_retention(self) -> None:
            """Timer: delete what the retention policy no longer keeps."""
            pruned = self.retention.run()
            total = sum(p.rows for p in pruned)
            if total:
                log.info(
                    "retention: pruned %d rows (longest batch %.1f ms)",
                    total,
                    max(p.longest_batch_s for p in pruned) * 1000,
                )

    return RetentionEntrypoints
