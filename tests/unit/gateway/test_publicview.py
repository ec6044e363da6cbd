"""PublicView: served from memory, replaced behind the readers, never stale
beyond max_age without the registry being asked in the foreground."""

from __future__ import annotations

import json

import pytest

from gateway.publicview import PublicView
from tests.support.polling import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """Answers public_view with a summary numbered by the call."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None

    def __call__(self) -> dict:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return {
            "summary": {"n": self.calls},
            "cities": [{"code": "shanghai", "n": self.calls}],
        }


def render(data) -> bytes:
    return json.dumps(data).encode()


@pytest.fixture
def parts():
    clock, registry, pending = Clock(), Registry(), []
    view = PublicView(
        load=registry,
        render_summary=render,
        render_city=render,
        ttl_s=1.0,
        max_age_s=10.0,
        spawn=pending.append,  # refreshes run when the test says
        clock=clock,
    )
    return view, clock, registry, pending


def served(view) -> int:
    return json.loads(view.current().summary.data)["n"]


def test_the_first_reader_loads_and_later_ones_share_it(parts):
    view, clock, registry, pending = parts
    assert served(view) == 1
    clock.now += 0.9
    assert served(view) == 1
    assert registry.calls == 1 and pending == []


def test_an_old_snapshot_is_served_while_one_refresh_runs_behind(parts):
    view, clock, registry, pending = parts
    served(view)
    clock.now += 1.5
    assert served(view) == 1
    assert served(view) == 1
    assert len(pending) == 1  # one refresh, however many readers noticed
    pending.pop()()
    assert served(view) == 2
    assert json.loads(view.current().cities["shanghai"].data) == {
        "code": "shanghai",
        "n": 2,
    }


def test_a_failed_refresh_keeps_the_snapshot_and_lets_the_next_try(parts):
    view, clock, registry, pending = parts
    served(view)
    clock.now += 2
    registry.fail = TimeoutError("registry")
    served(view)
    pending.pop()()
    assert served(view) == 1
    assert len(pending) == 1  # tried again
    registry.fail = None
    pending.pop()()
    assert served(view) == 3


def test_beyond_max_age_readers_wait_for_the_registry(parts):
    view, clock, registry, pending = parts
    served(view)
    clock.now += 11
    assert served(view) == 2
    assert pending == []


def test_beyond_max_age_an_unreachable_registry_is_an_error(parts):
    view, clock, registry, pending = parts
    served(view)
    clock.now += 11
    registry.fail = TimeoutError("registry")
    with pytest.raises(TimeoutError):
        view.current()


def test_a_slow_refresh_does_not_replace_a_newer_snapshot(parts):
    view, clock, registry, pending = parts
    served(view)
    clock.now += 2
    served(view)
    refresh = pending.pop()
    answer_of_the_slow_load = {"summary": {"n": 0}, "cities": []}

    def slow_load():
        # The registry is slow: while it answers, the snapshot grows older
        # than max_age and a reader loads a newer one in the foreground.
        clock.now += 20
        view._load = registry
        assert served(view) == 2
        return answer_of_the_slow_load

    view._load = slow_load
    refresh()  # finishes last, with the older reading
    assert served(view) == 2


def test_the_entity_tag_follows_the_bytes(parts):
    view, clock, registry, pending = parts
    first = view.current().summary
    clock.now += 11
    second = view.current().summary
    assert first.data != second.data and first.etag != second.etag
    assert view.current().summary.etag == second.etag


def test_the_background_refresh_runs_on_a_thread(parts):
    clock = Clock()
    view = PublicView(
        load=Registry(),
        render_summary=render,
        render_city=render,
        ttl_s=0.01,
        clock=clock,
    )

    assert served(view) == 1
    clock.now += 0.02  # past the TTL, well within the maximum age
    served(view)
    eventually(lambda: served(view) != 1, 5, "the refresh on its thread")
    assert served(view) >= 2


def test_an_unchanged_city_is_not_rendered_again(parts):
    view, clock, registry, pending = parts
    rendered = []
    registry_answers = iter([{"n": 1}, {"n": 1}, {"n": 2}])

    def load():
        figures = next(registry_answers)
        return {"summary": figures, "cities": [{"code": "wuhan", **figures}]}

    view._load = load
    view._render_city = lambda data: rendered.append(data) or render(data)
    first = view.current().cities["wuhan"]
    clock.now += 11
    second = view.current().cities["wuhan"]
    clock.now += 11
    third = view.current().cities["wuhan"]
    assert second is first and third.etag != first.etag
    assert rendered == [{"code": "wuhan", "n": 1}, {"code": "wuhan", "n": 2}]
