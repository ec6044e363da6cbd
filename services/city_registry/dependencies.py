"""Dependency providers of the registry: the cache of its computed answers and
the lock that applies federation events one at a time. Both are one object per
container, shared by all of its workers (STYLE.md principle 2): a test's
container starts with its own, and nothing lives at module level."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from eventlet.semaphore import Semaphore
from nameko.extensions import DependencyProvider

from services.common.caches import BoundedTtlCache

# The national summary and overview are recomputed at most this often per
# registry process: under load the portal's readers share one answer.
VIEW_CACHE_S = 2.0
# Cities' pages (a few hundred), the national views and the codes asked for
# that name no city: room for all of the first, a bound on the last.
VIEW_CACHE_MAX = 2048


class ViewCache:
    """One computed answer per key for ``VIEW_CACHE_S`` (or ``ttl(answer)``);
    shared by workers, at most ``max_entries`` of them.

    Single flight: while one worker recomputes an expired answer, the others
    serve the previous one rather than all recomputing at once.

    Some keys come from callers (``city:<code>``, a page asked for, found or
    not): the least recently used entry is evicted past ``max_entries``, so
    made-up codes cannot grow memory; the national views, read every second
    or two, stay at the recent end.
    """

    def __init__(self, max_entries: int = VIEW_CACHE_MAX) -> None:
        self._entries = BoundedTtlCache(max_entries)
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        key: str,
        compute: Callable[[], Any],
        ttl: Callable[[Any], float] = lambda _: VIEW_CACHE_S,
    ) -> Any:
        with self._lock:
            entry = self._entries.entry(key)
            if entry is not None and entry[0] > time.monotonic():
                return entry[1]
            if entry is not None and key in self._refreshing:
                return entry[1]
            self._refreshing.add(key)
        try:
            value = compute()
        finally:
            with self._lock:
                self._refreshing.discard(key)
        self._entries.put(key, value, ttl(value))
        return value

    def entry(self, key: str) -> tuple[float, Any] | None:
        """``(expires_at, answer)`` of ``key`` (monotonic clock), or None."""
        return self._entries.entry(key)

    def clear(self) -> None:
        self._entries.clear()


class Views(DependencyProvider):
    """Injects the container's :class:`ViewCache`, the same for every worker."""

    def setup(self) -> None:
        self.cache = ViewCache()

    def get_dependency(self, worker_ctx: Any) -> ViewCache:
        return self.cache


class ProjectionLock(DependencyProvider):
    """Injects the container's one-at-a-time lock for federation events.

    Events are applied in the order they were delivered. The increments are
    atomic, but attribution is not: a redemption or release that does not name
    its program (program_id is an extension of CONTRACTS §3) takes it from the
    voucher_issued before it, which must have been applied first. Green threads
    waiting on PostgreSQL would otherwise interleave them. The semaphore's
    waiters are woken in FIFO order.
    """

    def setup(self) -> None:
        self.lock = Semaphore(1)

    def get_dependency(self, worker_ctx: Any) -> Semaphore:
        return self.lock


class Prefixes:
    """The voucher prefix reserved for each city, as read from the store.

    Checked on every federation event; a reservation never changes once made,
    so one found is kept for the container's life. A city without one yet is
    asked again each time (it may be admitted in the meantime).
    """

    def __init__(self) -> None:
        self._held: dict[str, str] = {}

    def of(self, city: str, load: Callable[[str], str | None]) -> str | None:
        held = self._held.get(city)
        if held is None:
            held = load(city)
            if held is not None:
                self._held[city] = held
        return held


class PrefixReservations(DependencyProvider):
    """Injects the container's :class:`Prefixes`, the same for every worker."""

    def setup(self) -> None:
        self.prefixes = Prefixes()

    def get_dependency(self, worker_ctx: Any) -> Prefixes:
        return self.prefixes
