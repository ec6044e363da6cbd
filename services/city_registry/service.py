"""Entrypoints of ``city_registry``, the national registry (docs/ARCHITECTURE.md).

RPC for the portal and metering, and the consumer of the federation events
that keeps the national read model. The rules are in ``domain.py``, the SQL in
``store.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import eventlet
from nameko import config
from nameko.rpc import ServiceRpc, rpc

from services.city_registry import domain
from services.city_registry.store import RegistryDatabase
from services.common.amqp import (
    FEDERATION_EXCHANGE,
    RawMessage,
    consume_raw,
    durable_queue,
)
from services.common.config import STALE_AFTER_S
from services.common.errors import EXPECTED, NotFound
from services.common.signing import new_key_id, new_secret
from services.common.units import utcnow

log = logging.getLogger("computenet.city_registry")

FEDERATION_QUEUE = "city_registry.federation"
DEFAULT_STALE_AFTER_S = 90
USAGE_WINDOW_HOURS = 24
# The portal waits for us; a slow metering must not make it wait for ever.
METERING_TIMEOUT_S = 3.0


def _stale_after_s() -> float:
    return float(config.get(STALE_AFTER_S) or DEFAULT_STALE_AFTER_S)


class CityRegistryService:
    name = "city_registry"

    store = RegistryDatabase()
    metering_rpc = ServiceRpc("metering")

    # ------------------------------------------------------------ federation

    @consume_raw(
        durable_queue(FEDERATION_QUEUE, FEDERATION_EXCHANGE, domain.ROUTING_KEYS),
        requeue_on_error=True,
    )
    def handle_federation_event(self, message: RawMessage) -> None:
        """Project one city event; a database fault requeues it, nothing is lost."""
        try:
            event, body = domain.decode_event(message.routing_key, message.body)
        except domain.RejectedEvent as exc:
            log.warning("dropped federation message: %s", exc)
            return
        if not self.store.apply_event(event, body, utcnow()):
            log.info("duplicate %s %s dropped", event, body["event_id"])

    # ------------------------------------------------------------ cities

    @rpc(expected_exceptions=EXPECTED)
    def list_cities(self) -> list[dict[str, Any]]:
        now, stale = utcnow(), _stale_after_s()
        return [domain.city_view(city, now, stale) for city in self.store.cities()]

    @rpc(expected_exceptions=EXPECTED)
    def get_city(self, code: str) -> dict[str, Any]:
        city = self.store.city(code) if isinstance(code, str) else None
        if city is None:
            raise NotFound("city_not_found", f"no city {code!r}", {"city": code})
        return domain.city_view(city, utcnow(), _stale_after_s())

    @rpc(expected_exceptions=EXPECTED)
    def voucher_prefixes(self) -> dict[str, str]:
        return domain.voucher_prefixes(self.store.cities())

    # ------------------------------------------------------------ data centres

    @rpc(expected_exceptions=EXPECTED)
    def list_datacenters(self) -> list[dict[str, Any]]:
        overview = self._usage_overview()
        return [domain.datacenter_view(dc, overview) for dc in self.store.datacenters()]

    @rpc(expected_exceptions=EXPECTED)
    def get_datacenter(self, datacenter_id: str) -> dict[str, Any]:
        return domain.datacenter_view(
            self._datacenter(datacenter_id), self._usage_overview()
        )

    @rpc(expected_exceptions=EXPECTED)
    def datacenter_signing_keys(self, datacenter_id: str) -> list[dict[str, str]]:
        self._datacenter(datacenter_id)
        return self.store.active_keys(datacenter_id)

    @rpc(expected_exceptions=EXPECTED)
    def issue_datacenter_key(self, datacenter_id: str) -> dict[str, str]:
        key_id, secret = new_key_id(datacenter_id), new_secret()
        if not self.store.add_key(datacenter_id, key_id, secret, utcnow()):
            raise self._datacenter_not_found(datacenter_id)
        return {"key_id": key_id, "secret": secret}

    # ------------------------------------------------------------ tokens

    @rpc(expected_exceptions=EXPECTED)
    def issue_token(self, role: str) -> str:
        role = domain.validate_role(role)
        token = domain.new_token()
        self.store.add_token(domain.token_digest(token), role, utcnow())
        return token

    @rpc(expected_exceptions=EXPECTED, sensitive_arguments=("token",))
    def authenticate(self, token: str) -> dict[str, str] | None:
        if not isinstance(token, str) or not token:
            return None
        role = self.store.role_for(domain.token_digest(token))
        return {"role": role} if role is not None else None

    # ------------------------------------------------------------ national view

    @rpc(expected_exceptions=EXPECTED)
    def network_summary(self) -> dict[str, Any]:
        return domain.network_summary(
            self.store.cities(),
            self.store.datacenters(),
            self._usage_overview(),
            utcnow(),
            _stale_after_s(),
        )

    # ------------------------------------------------------------ helpers

    def _datacenter(self, datacenter_id: str) -> domain.DatacenterState:
        dc = (
            self.store.datacenter(datacenter_id)
            if isinstance(datacenter_id, str)
            else None
        )
        if dc is None:
            raise self._datacenter_not_found(datacenter_id)
        return dc

    @staticmethod
    def _datacenter_not_found(datacenter_id: Any) -> NotFound:
        return NotFound(
            "datacenter_not_found",
            f"no data centre {datacenter_id!r}",
            {"datacenter_id": datacenter_id},
        )

    def _usage_overview(self) -> dict[str, Any] | None:
        """metering's figures, or None when it is down, absent or slow.

        The registry's own answers (money, inventories) must not fail because
        metering does: GPU-seconds and utilisation are then null.
        """
        try:
            with eventlet.Timeout(METERING_TIMEOUT_S):
                return self.metering_rpc.usage_overview(window_hours=USAGE_WINDOW_HOURS)
        except eventlet.Timeout:
            log.warning("metering.usage_overview timed out")
        except Exception as exc:  # noqa: BLE001 - any failure means "unknown"
            log.warning("metering.usage_overview failed: %r", exc)
        return None
