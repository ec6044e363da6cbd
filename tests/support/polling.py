"""``eventually``: the tests' one way to wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import requests

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


# What a probe of a network over HTTP may raise while the network is still
# starting or settling: a refused connection, an error page that is not JSON,
# an answer without the figure yet.
HTTP_HICCUPS = (requests.RequestException, ValueError, KeyError)


def eventually_over_http(
    predicate: Callable[[], T],
    timeout: float = 90.0,
    what: str | Callable[[], str] = "the network",
    *,
    interval: float = 0.5,
) -> T:
    """:func:`eventually` for probes that ask a running network over HTTP
    (the e2e ring): patient, and the :data:`HTTP_HICCUPS` count as "not yet"."""
    return eventually(
        predicate, timeout, what, interval=interval, ignoring=HTTP_HICCUPS
    )
