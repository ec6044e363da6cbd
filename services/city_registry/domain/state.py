"""The registry's read model as plain data: cities with their programs' money,
data centres with their inventories. Filled by ``store.py``, read by every
other module of the domain."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

REMOVED = "removed"  # the status of a city the national admin removed
DATACENTER_ID = re.compile(r"^[a-z0-9-]+$")


@dataclass(kw_only=True)
class Figures:
    """What the federation events moved, for a program or a whole city (or
    what one event moves: ``events.LedgerDelta``)."""

    committed_fen: int = 0
    redeemed_fen: int = 0
    released_fen: int = 0
    vouchers_issued: int = 0
    vouchers_closed: int = 0

    @property
    def vouchers_active(self) -> int:
        return self.vouchers_issued - self.vouchers_closed

    @property
    def is_zero(self) -> bool:
        return not (
            self.committed_fen
            or self.redeemed_fen
            or self.released_fen
            or self.vouchers_issued
            or self.vouchers_closed
        )


# The names of those figures, as the tables name their columns too.
FIGURES = tuple(figure.name for figure in fields(Figures))


@dataclass
class ProgramState(Figures):
    id: str
    kind: str | None = None
    budget_fen: int = 0
    rate_bp: int | None = None
    rules_version: str | None = None
    rules_sha256: str | None = None
    # max_rate_bp, bonuses, datacenters when the city publishes them
    terms: dict[str, Any] | None = None


@dataclass
class CityState(Figures):
    code: str
    name: str
    region: str | None = None
    voucher_prefix: str | None = None
    last_heartbeat_at: datetime | None = None
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
    city: str | None  # optional on registration: null when not stated
    hub_region: str
    government_run: bool
    inventory: list[InventoryItem] = field(default_factory=list)
    removed: bool = False

    @property
    def gpus(self) -> int:
        return sum(item.count for item in self.inventory)
