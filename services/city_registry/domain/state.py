"""The registry's read model as plain data: cities with their programs' money,
data centres with their inventories. Filled by ``store.py``, read by every
other module of the domain."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

REMOVED = "removed"  # the status of a city the national admin removed
DATACENTER_ID = re.compile(r"^[a-z0-9-]+$")


@dataclass
class ProgramState:
    id: str
    kind: str | None = None
    budget_fen: int = 0
    rate_bp: int | None = None
    rules_version: str | None = None
    rules_sha256: str | None = None
    committed_fen: int = 0
    redeemed_fen: int = 0
    released_fen: int = 0
    vouchers_issued: int = 0
    vouchers_closed: int = 0
    # max_rate_bp, bonuses, datacenters when the city publishes them
    terms: dict[str, Any] | None = None


@dataclass
class CityState:
    code: str
    name: str
    region: str | None = None
    voucher_prefix: str | None = None
    last_heartbeat_at: datetime | None = None
    committed_fen: int = 0
    redeemed_fen: int = 0
    released_fen: int = 0
    vouchers_issued: int = 0
    vouchers_closed: int = 0
    admitted_at: datetime | None = None
    removed_at: datetime | None = None
    programs: list[ProgramState] = field(default_factory=list)


@dataclass
class InventoryItem:
    gpu_model: str
    count: int
    chip_origin: str
    price_fen_per_gpu_hour: int


@dataclass
class DatacenterState:
    id: str
    name: str
    operator: str
    city: str
    hub_region: str
    government_run: bool
    inventory: list[InventoryItem] = field(default_factory=list)
    removed: bool = False

    @property
    def gpus(self) -> int:
        return sum(item.count for item in self.inventory)


def vouchers_active(city_or_program: CityState | ProgramState) -> int:
    return city_or_program.vouchers_issued - city_or_program.vouchers_closed
