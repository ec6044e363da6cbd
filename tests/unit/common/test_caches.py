"""The bounded cache: at most ``max_entries``, least recently used out first,
each entry until its own expiry."""

from __future__ import annotations

import pytest

from services.common.caches import BoundedTtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_never_holds_more_than_its_bound():
    cache = BoundedTtlCache(100)
    for n in range(10_000):
        cache.put(f"made-up-{n}", None, 60)
    assert len(cache) == 100


def test_the_least_recently_used_entry_goes_first():
    cache = BoundedTtlCache(2)
    cache.put("a", 1, 60)
    cache.put("b", 2, 60)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3, 60)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)


def test_an_entry_expires_at_its_own_time():
    clock = Clock()
    cache = BoundedTtlCache(10, clock=clock)
    cache.put("short", "s", 5)
    cache.put("long", "l", 30)
    clock.now = 10
    assert cache.get("short") is None
    assert cache.get("long") == "l"
    # The expired value is still there for a single-flight reader.
    assert cache.entry("short") == (5, "s")


def test_get_or_load_loads_once_while_fresh():
    clock = Clock()
    cache = BoundedTtlCache(10, clock=clock)
    loads = []

    def load():
        loads.append(1)
        return len(loads)

    assert cache.get_or_load("k", load, lambda _: 5) == 1
    assert cache.get_or_load("k", load, lambda _: 5) == 1
    clock.now = 6
    assert cache.get_or_load("k", load, lambda _: 5) == 2


def test_a_cache_of_nothing_is_refused():
    with pytest.raises(ValueError):
        BoundedTtlCache(0)
