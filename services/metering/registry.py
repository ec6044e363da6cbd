"""What metering asks city_registry, cached for ``REGISTRY_CACHE_TTL_S``.

Every usage message needs its data centre, the data centre's active signing
keys and the voucher prefixes; asking the registry for each would make it the
bottleneck. Entries live for the TTL; an unknown key id or voucher prefix is
refetched at once (a key rotated or a city admitted a moment ago must not
turn good records into dead letters). An unknown data centre is not cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import eventlet
from nameko import config
from nameko.extensions import DependencyProvider

from services.common.config import REGISTRY_CACHE_TTL_S, RPC_TIMEOUT_S
from services.common.errors import NotFound, Unavailable
from services.common.principals import NATIONAL_BROKER_USERS, national_users

DEFAULT_TTL_S = 30.0
DEFAULT_RPC_TIMEOUT_S = 10.0


class RegistryCacheState:
    """The cached answers, shared by every worker of one container."""

    def __init__(
        self,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
        national: frozenset[str] | None = None,
    ):
        self.ttl_s = ttl_s
        # the national side's broker users: who besides dc.<id> may publish
        # <id>.usage (a replay, an operator's tool); principals.py
        self.national = national if national is not None else national_users()
        self.rpc_timeout_s = rpc_timeout_s
        self.clock = clock
        self.datacenters: dict[str, tuple[float, dict]] = {}
        self.keys: dict[str, tuple[float, dict[str, str]]] = {}
        self.prefixes: tuple[float, dict[str, str]] | None = None

    def fresh(self, fetched_at: float) -> bool:
        return self.clock() - fetched_at < self.ttl_s


class CachedRegistry:
    """One worker's view: the shared cache in front of its own RPC client."""

    def __init__(self, state: RegistryCacheState, client: Any):
        self.state = state
        self.client = client

    def _call(self, method: str, *args: Any) -> Any:
        # nameko's RPC waits forever for a reply; a registry that is down must
        # requeue the message (Unavailable), not hang the worker and shutdown.
        try:
            with eventlet.Timeout(self.state.rpc_timeout_s):
                return getattr(self.client, method)(*args)
        except eventlet.Timeout:
            raise Unavailable(
                "registry_unavailable", f"city_registry.{method} timed out"
            ) from None

    def datacenter(self, datacenter_id: str) -> dict | None:
        """The registry's Datacenter, or None if it is not registered."""
        entry = self.state.datacenters.get(datacenter_id)
        if entry is not None and self.state.fresh(entry[0]):
            return entry[1]
        try:
            found = self._call("get_datacenter", datacenter_id)
        except NotFound:
            self.state.datacenters.pop(datacenter_id, None)
            return None
        self.state.datacenters[datacenter_id] = (self.state.clock(), found)
        return found

    def _fetch_keys(self, datacenter_id: str) -> dict[str, str]:
        try:
            listed = self._call("datacenter_signing_keys", datacenter_id)
        except NotFound:
            listed = []
        keys = {key["key_id"]: key["secret"] for key in listed}
        self.state.keys[datacenter_id] = (self.state.clock(), keys)
        return keys

    def signing_keys(self, datacenter_id: str, key_id: str | None) -> dict[str, str]:
        """Active keys ``{key_id: secret}``, refetched if ``key_id`` is new."""
        entry = self.state.keys.get(datacenter_id)
        if entry is None or not self.state.fresh(entry[0]):
            return self._fetch_keys(datacenter_id)
        if key_id and key_id not in entry[1]:
            return self._fetch_keys(datacenter_id)
        return entry[1]

    def _fetch_prefixes(self) -> dict[str, str]:
        prefixes = dict(self._call("voucher_prefixes"))
        self.state.prefixes = (self.state.clock(), prefixes)
        return prefixes

    def city_of_prefix(self, prefix: str) -> str | None:
        """The city that issues codes starting ``prefix``, or None."""
        entry = self.state.prefixes
        if entry is None or not self.state.fresh(entry[0]):
            prefixes = self._fetch_prefixes()
        else:
            prefixes = entry[1]
            if prefix not in prefixes:
                prefixes = self._fetch_prefixes()
        return prefixes.get(prefix)


class RegistryCache(DependencyProvider):
    """Injects ``cached(city_registry_rpc) -> CachedRegistry``.

    The cache is the container's; the RPC client is the worker's own (nameko
    dependencies cannot nest, so the service passes its ``ServiceRpc`` in).
    """

    def setup(self):
        ttl = config.get(REGISTRY_CACHE_TTL_S, DEFAULT_TTL_S)
        timeout = config.get(RPC_TIMEOUT_S, DEFAULT_RPC_TIMEOUT_S)
        self.state = RegistryCacheState(
            float(ttl),
            rpc_timeout_s=float(timeout),
            national=national_users(config.get(NATIONAL_BROKER_USERS)),
        )

    def get_dependency(self, worker_ctx) -> Callable[[Any], CachedRegistry]:
        return partial(CachedRegistry, self.state)
