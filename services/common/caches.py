"""Bounded caches: what a caller's input may key, at most ``max_entries`` of it.

The portal caches a token's role, the registry a city's page, both keyed by
what a caller sends (any token, any city code): an anonymous caller sending a
new key per request must not grow memory without bound, nor flush what the
legitimate callers have cached. :class:`BoundedTtlCache` keeps each entry
until it expires and at most ``max_entries`` of them, evicting the least
recently used first (one entry at a time, never the whole cache).

The bound and the eviction order are cachetools' ``LRUCache``; the expiry is
kept here beside each value, because an expired value must stay readable for
single-flight readers (``entry``, see ``city_registry/dependencies.py``),
where cachetools' ``TTLCache`` would already have dropped it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from cachetools import LRUCache

_MISSING = object()


class BoundedTtlCache:
    """Thread-safe, at most ``max_entries``; each entry has its own expiry."""

    def __init__(
        self, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: LRUCache = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entry(self, key: Hashable) -> tuple[float, Any] | None:
        """``(expires_at, value)``, expired or not, or None; marks it used."""
        with self._lock:
            return self._entries.get(key)  # a read marks it recently used

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value while it has not expired, else ``default``."""
        found = self.entry(key)
        if found is None or found[0] <= self._clock():
            return default
        return found[1]

    def put(self, key: Hashable, value: Any, ttl_s: float) -> None:
        with self._lock:
            self._entries[key] = (self._clock() + ttl_s, value)  # evicts the LRU

    def get_or_load(
        self, key: Hashable, load: Callable[[], Any], ttl: Callable[[Any], float]
    ) -> Any:
        """The cached value, or ``load()``'s, kept ``ttl(value)`` seconds.

        ``load`` runs outside the lock: an RPC must not serialise callers.
        """
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        value = load()
        self.put(key, value, ttl(value))
        return value

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
