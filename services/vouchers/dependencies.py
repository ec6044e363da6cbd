"""Dependency providers of the voucher service: its ledger, its clock, and the
outbox events published but not yet marked so."""

from __future__ import annotations

import time

from nameko import config
from nameko.extensions import DependencyProvider

from services.common.config import CITY_CODE, RULES_FILE, VOUCHER_PREFIX
from services.common.db import Database, retry_on_conflict
from services.vouchers.ledger import CityLedger, sync_programs
from services.vouchers.rules import instance_rules


class Ledger(Database):
    """Injects a :class:`CityLedger`: a session per worker and the city's rules.

    ``setup()`` loads the rules file and brings the program rows in line with
    it, so the service never runs on rules its database has not seen.
    """

    def setup(self):
        super().setup()
        self.rules = instance_rules(
            config[RULES_FILE], config[CITY_CODE], config.get(VOUCHER_PREFIX)
        )
        # Another copy of this city's service may fund the programs at the
        # same moment: its rows are there then, sync against them.
        retry_on_conflict(self._sync_programs, 2)

    def _sync_programs(self) -> None:
        session = self.sessionmaker()
        try:
            sync_programs(session, self.rules)
        finally:
            session.close()

    def get_dependency(self, worker_ctx) -> CityLedger:
        return CityLedger(super().get_dependency(worker_ctx), self.rules)


class Clock:
    def __init__(self, provider: Uptime):
        self._provider = provider

    @property
    def uptime_s(self) -> int:
        return int(time.monotonic() - self._provider.started)

    @property
    def started_at(self) -> float:
        return self._provider.started_wall

    def next_tick(self) -> int:
        """0 for the first tick, then 1, 2 …"""
        tick = self._provider.ticks
        self._provider.ticks += 1
        return tick


class Uptime(DependencyProvider):
    """Counts the service's timer ticks and its uptime."""

    def setup(self):
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.ticks = 0

    def get_dependency(self, worker_ctx) -> Clock:
        return Clock(self)


class _Marks:
    def __init__(self, provider: OutboxMarks):
        self._provider = provider

    def add(self, ids) -> None:
        self._provider.ids.update(ids)

    def take(self) -> list[int]:
        ids, self._provider.ids = self._provider.ids, set()
        return sorted(ids)


class OutboxMarks(DependencyProvider):
    """Outbox ids published by this process and not yet marked in the database.

    Shared by every worker of the service (green threads: no lock needed);
    lost on a crash, which only means the relay publishes them again.
    """

    def setup(self):
        self.ids: set[int] = set()

    def get_dependency(self, worker_ctx) -> _Marks:
        return _Marks(self)
