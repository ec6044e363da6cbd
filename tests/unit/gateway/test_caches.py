"""The portal's caches of what callers send: bounded, and the refused
answers kept apart from the valid ones (gateway/auth.py, gateway/directory.py),
and the registry's view cache (city_registry/dependencies.py)."""

from __future__ import annotations

from gateway.auth import AuthCache
from gateway.directory import Directory
from services.city_registry.dependencies import ViewCache


def test_made_up_tokens_never_evict_a_valid_one():
    cache = AuthCache(max_known=10, max_unknown=5)
    cache.get_or_load("valid", lambda: {"role": "national_admin"})
    for n in range(1000):
        assert cache.get_or_load(f"made-up-{n}", lambda: None) is None
    assert len(cache.unknown) == 5
    assert len(cache.known) == 1
    assert cache.get_or_load("valid", lambda: None) == {"role": "national_admin"}


def test_a_refused_token_is_asked_about_again_soon():
    answers = iter([None, {"role": "city_admin:shanghai"}])
    cache = AuthCache()
    assert cache.get_or_load("t", lambda: next(answers)) is None
    cache.unknown.clear()  # its 5 s have passed
    assert cache.get_or_load("t", lambda: next(answers)) == {
        "role": "city_admin:shanghai"
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_directory_answers_misses_from_memory_between_refreshes():
    clock, loads = Clock(), []

    def load():
        loads.append(clock.now)
        return {"shanghai": "live"}

    found = Directory(load, ttl_s=60, miss_refresh_s=5, clock=clock)
    assert found.get("shanghai") == "live"
    for n in range(1000):
        assert found.get(f"made-up-{n}") is None
    assert loads == [0.0]  # a thousand misses, no call
    clock.now = 6
    assert found.get("made-up") is None
    assert loads == [0.0, 6.0]  # one refresh after MISS_REFRESH_S


def test_directory_finds_a_city_admitted_since_its_snapshot():
    clock, cities = Clock(), {"shanghai": "live"}
    found = Directory(lambda: dict(cities), miss_refresh_s=5, clock=clock)
    assert found.get("wuhan") is None
    cities["wuhan"] = "unknown"
    clock.now = 5
    assert found.get("wuhan") == "unknown"
    cities["ningbo"] = "unknown"
    found.invalidate()  # admitted through this portal
    assert found.get("ningbo") == "unknown"


def test_registry_view_cache_is_bounded_and_keeps_what_is_read_often():
    cache = ViewCache(max_entries=50)
    cache.get("public", lambda: "summary")
    for n in range(1000):
        cache.get(f"city:made-up-{n}", lambda: None)
        cache.get("public", lambda: "recomputed")
    assert len(cache) == 50
    assert cache.get("public", lambda: "recomputed") == "summary"
