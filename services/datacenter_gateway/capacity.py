"""The capacity report (CONTRACTS.md §2): GPUs installed and busy, every interval.

Sent once at start and then every ``CAPACITY_INTERVAL_S``; if the broker is
down the round is skipped (the next report supersedes it), not queued.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from services.common.amqp import capacity_key
from services.common.config import DATACENTER_ID, DATACENTERS_FILE, INVENTORY
from services.common.principals import username_of
from services.common.units import format_ts, utcnow
from services.datacenter_gateway import domain
from services.datacenter_gateway.background import BackgroundLoop
from services.datacenter_gateway.outbox import Outbox
from services.datacenter_gateway.relay import open_producer, publish_signed

log = logging.getLogger("computenet.datacenter_gateway.capacity")


class CapacityReporter(BackgroundLoop):
    thread_name = "capacity"

    def __init__(
        self,
        outbox: Outbox,
        amqp_uri: str,
        datacenter_id: str,
        key_id: str,
        secret: str,
        inventory: list[domain.InventoryItem],
        interval_s: float = 60.0,
        keys: domain.SigningKeys | None = None,
        ssl: dict | None = None,
    ):
        self.outbox = outbox
        self.amqp_uri = amqp_uri
        self.ssl = ssl  # kombu's, from services/common/broker_tls.py
        self.datacenter_id = datacenter_id
        self.key_id = key_id
        self.secret = secret
        self.inventory = list(inventory)
        self.interval_s = float(interval_s)
        self.keys = keys or domain.SigningKeys(domain.SigningKey(key_id, secret))
        super().__init__()

    def start(self) -> None:
        if not self.inventory:
            log.warning(
                "capacity: no inventory for %s in the data-centre list; not reporting",
                self.datacenter_id,
            )
            return
        super().start()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.report_once()
            except Exception as exc:  # noqa: BLE001 - skip this round, try the next
                log.warning(
                    "capacity: report skipped (%s: %s)", type(exc).__name__, exc
                )
            self._stop.wait(self.interval_s)

    def report_once(self) -> bytes:
        """Build, sign and publish one report; returns the body sent."""
        now = utcnow()
        body = domain.capacity_report(
            self.datacenter_id, self.inventory, self.outbox.allocated_gpus(now), now
        )
        key = self.keys.active(now)
        conn, producer = open_producer(self.amqp_uri, ssl=self.ssl)
        try:
            publish_signed(
                producer,
                body,
                capacity_key(self.datacenter_id),
                f"{self.datacenter_id}.capacity.{format_ts(now)}",
                key.key_id,
                key.secret,
                user_id=username_of(self.amqp_uri),
            )
        finally:
            conn.release()
        return body


def load_inventory(settings: Mapping[str, Any]) -> list[domain.InventoryItem]:
    """This data centre's GPUs: ``INVENTORY`` if configured, else its entry in
    ``DATACENTERS_FILE``; empty when neither knows it."""
    if settings.get(INVENTORY):
        return domain.inventory_items(settings[INVENTORY])
    path = settings.get(DATACENTERS_FILE)
    if not path:
        return []
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        log.warning("capacity: cannot read %s: %s", path, exc)
        return []
    return domain.parse_inventory(data, settings[DATACENTER_ID])
