"""``eventually``: the tests' one way to wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    predicate: Callable[[], T],
    timeout: float = 15.0,
    what: str | Callable[[], str] = "the condition",
    *,
    interval: float = 0.1,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy and return that.

    An exception of a type in ``ignoring`` (a service still starting, a
    connection refused) counts as "not yet". After ``timeout`` seconds fail
    with an ``AssertionError`` naming ``what`` (a callable is asked then) and
    the last value or exception.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: object = predicate()
        except ignoring as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            named = what() if callable(what) else what
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {named}; last: {last!r}"
            )
        time.sleep(interval)
