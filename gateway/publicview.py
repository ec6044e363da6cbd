"""The public national view, held in memory by each portal process.

The network summary and the city pages are the same for every reader and are
what every dashboard polls. Asking the registry per request put an RPC round
trip (and, on a miss, a read of the read model) in front of each of them; under
20 concurrent readers the city pages' p99 was 270–340 ms.

Instead the portal holds one snapshot of everything public (the registry's
``public_view``: the summary and every city page, read together), already
rendered to JSON bytes. A snapshot older than ``ttl_s`` is replaced *behind*
the readers: the first reader to notice starts one background refresh and
everyone goes on being served the snapshot in hand. Readers wait for the
registry only when there is no snapshot yet, or when the one in hand is older
than ``max_age_s`` (the registry has not answered for that long): then they
load it themselves, and an unreachable registry is an error, not a silently
old figure.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("gateway.publicview")

DEFAULT_MAX_AGE_S = 15.0


@dataclass(frozen=True)
class Body:
    """A rendered JSON answer and its entity tag."""

    data: bytes
    etag: str

    @classmethod
    def of(cls, data: bytes) -> Body:
        return cls(data, hashlib.blake2b(data, digest_size=12).hexdigest())


@dataclass(frozen=True)
class Snapshot:
    loaded_at: float  # monotonic
    summary: Body
    cities: dict[str, Body] = field(default_factory=dict)


def _start_thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, name="public-view-refresh", daemon=True).start()


class PublicView:
    """``current()`` → the Snapshot to serve; see the module docstring.

    ``load()`` returns the registry's ``public_view`` answer and ``render``
    turns one JSON-able object into bytes; ``spawn`` runs a refresh in the
    background and ``clock`` is monotonic (both replaceable in tests).
    """

    def __init__(
        self,
        load: Callable[[], dict[str, Any]],
        render_summary: Callable[[Any], bytes],
        render_city: Callable[[Any], bytes],
        ttl_s: float,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        spawn: Callable[[Callable[[], None]], None] = _start_thread,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._load = load
        self._render_summary = render_summary
        self._render_city = render_city
        self.ttl_s = ttl_s
        self.max_age_s = max(max_age_s, ttl_s)
        self._spawn = spawn
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._refreshing = False
        self._state = threading.Lock()  # guards _snapshot and _refreshing
        self._loading = threading.Lock()  # one foreground load at a time
        self._rendering = threading.Lock()  # guards _rendered
        self._rendered: dict[str, tuple[Any, Body]] = {}

    def current(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None or self._age(snapshot) > self.max_age_s:
            return self._load_in_foreground()
        if self._age(snapshot) > self.ttl_s:
            self._refresh_behind()
        return snapshot

    def _age(self, snapshot: Snapshot) -> float:
        return self._clock() - snapshot.loaded_at

    def _load_in_foreground(self) -> Snapshot:
        with self._loading:
            snapshot = self._snapshot  # another reader may have just loaded it
            if snapshot is not None and self._age(snapshot) <= self.ttl_s:
                return snapshot
            return self._replace()

    def _refresh_behind(self) -> None:
        with self._state:
            if self._refreshing:
                return
            self._refreshing = True

        def refresh() -> None:
            try:
                self._replace()
            except Exception as exc:  # noqa: BLE001 - readers keep the old one
                log.warning("public view not refreshed: %r", exc)
            finally:
                with self._state:
                    self._refreshing = False

        try:
            self._spawn(refresh)
        except Exception:
            with self._state:
                self._refreshing = False
            raise

    def _render(self, key: str, data: Any, render: Callable[[Any], bytes]) -> Body:
        """Rendered once per change: most cities are as they were a second ago."""
        before = self._rendered.get(key)
        if before is not None and before[0] == data:
            return before[1]
        body = Body.of(render(data))
        self._rendered[key] = (data, body)
        return body

    def _replace(self) -> Snapshot:
        began = self._clock()
        answer = self._load()
        with self._rendering:
            snapshot = Snapshot(
                loaded_at=began,
                summary=self._render("", answer["summary"], self._render_summary),
                cities={
                    city["code"]: self._render(
                        f"city:{city['code']}", city, self._render_city
                    )
                    for city in answer["cities"]
                },
            )
            known = {"", *(f"city:{code}" for code in snapshot.cities)}
            for key in self._rendered.keys() - known:
                del self._rendered[key]
        with self._state:
            current = self._snapshot
            # A slow load must not replace a newer one that overtook it.
            if current is None or current.loaded_at <= snapshot.loaded_at:
                self._snapshot = snapshot
            return self._snapshot
