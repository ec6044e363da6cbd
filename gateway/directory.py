"""Which cities and voucher prefixes exist, held in memory for every request.

A city code in a path and a voucher code's prefix become the name of an RPC
service (``vouchers_<city>``). Routing a call to a city that does not exist
waits for the RPC timeout and answers 503; asking the registry per request
lets anyone make the portal call it with made-up names. So each portal
process keeps one snapshot of the registry's list (``list_cities``, and
``voucher_prefixes``) and answers an unknown name **404 from memory**.

- A snapshot older than ``DIRECTORY_TTL_S`` is fetched again.
- A name not in the snapshot makes it fetched again (a city admitted a
  moment ago is found at once), but at most once per ``MISS_REFRESH_S``:
  a caller sending a new made-up name per request costs the registry one
  call every few seconds, not one per request.
- Nothing is stored per name asked for: memory is one snapshot, whatever
  callers send. Admitting or removing a city through this portal drops the
  snapshot (:func:`invalidate`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from flask import current_app

from services.common.contracts import CITY_CODE
from services.common.errors import NotFound

DIRECTORY_TTL_S = 60.0
MISS_REFRESH_S = 5.0
CITIES = "city_directory"  # keys in app.extensions
PREFIXES = "voucher_prefix_directory"
REMOVED = "removed"


class Directory:
    """One mapping, loaded whole by ``load()``; see the module's docstring."""

    def __init__(
        self,
        load: Callable[[], Mapping[str, Any]],
        ttl_s: float = DIRECTORY_TTL_S,
        miss_refresh_s: float = MISS_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.ttl_s = ttl_s
        self.miss_refresh_s = miss_refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._loaded_at: float | None = None
        self._entries: Mapping[str, Any] = {}

    def _refresh(self) -> Mapping[str, Any]:
        entries = dict(self._load())  # outside the lock: an RPC
        with self._lock:
            self._entries, self._loaded_at = entries, self._clock()
        return entries

    def _age(self) -> float | None:
        with self._lock:
            if self._loaded_at is None:
                return None
            return self._clock() - self._loaded_at

    def get(self, name: str) -> Any:
        """The entry of ``name``, or None when the registry has none."""
        age = self._age()
        if age is None or age >= self.ttl_s:
            entries = self._refresh()
        else:
            with self._lock:
                entries = self._entries
        if name in entries:
            return entries[name]
        age = self._age()
        if age is not None and age >= self.miss_refresh_s:
            return self._refresh().get(name)
        return None

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = None


def install(app: Any, rpc: Any) -> None:
    """The two directories of ``app``, over ``rpc``."""

    def cities() -> dict[str, str]:
        listed = rpc.call("city_registry", "list_cities") or []
        return {city["code"]: city.get("status") or "unknown" for city in listed}

    app.extensions[CITIES] = Directory(cities)
    app.extensions[PREFIXES] = Directory(
        lambda: rpc.call("city_registry", "voucher_prefixes") or {}
    )


def invalidate() -> None:
    for key in (CITIES, PREFIXES):
        current_app.extensions[key].invalidate()


def city_not_found(city: str) -> NotFound:
    return NotFound("city_not_found", f"no city {city!r} in the network")


def city_listed(city: str) -> bool:
    """True when the registry lists ``city`` (a removed one too)."""
    if not isinstance(city, str) or not CITY_CODE.match(city):
        return False
    return current_app.extensions[CITIES].get(city) is not None


def known_city(city: str) -> None:
    """``NotFound city_not_found`` unless ``city`` is a member that serves RPC.

    A removed city keeps its public page (the registry's ``get_city``) but no
    longer runs its service: nothing is routed to it.
    """
    # The city code becomes a service name: never route an arbitrary string.
    if not isinstance(city, str) or not CITY_CODE.match(city):
        raise city_not_found(city)
    status = current_app.extensions[CITIES].get(city)
    if status is None:
        raise city_not_found(city)
    if status == REMOVED:
        raise NotFound("city_not_found", f"city {city!r} was removed from the network")


def city_of_prefix(prefix: str) -> str | None:
    """The city issuing voucher codes with ``prefix``, or None."""
    return current_app.extensions[PREFIXES].get(prefix)
