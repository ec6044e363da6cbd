"""The national registry's rules, in pure Python (no nameko, no SQLAlchemy, no I/O).

- the federation read model: how each event moves a program's and a city's
  committed, redeemed and released money, and when a city counts as live;
- the seed files under ``deploy/`` (cities and data centres), as plain data;
- roles and tokens, data-centre signing-key rotation;
- the shapes the registry answers with (City, Datacenter, network summary).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from marshmallow import ValidationError

from services.common.contracts import load_event
from services.common.errors import InvalidRequest
from services.common.units import format_ts

# Events of computenet.federation that the registry projects (CONTRACTS.md §3).
REGISTRY_EVENTS = (
    "program_published",
    "voucher_issued",
    "voucher_redeemed",
    "voucher_released",
    "heartbeat",
)
ROUTING_KEYS = [f"*.{event}" for event in REGISTRY_EVENTS]

# Two keys stay active so that a data centre can roll its gateway onto the new
# one while messages signed with the old one are still in flight.
ACTIVE_KEYS_PER_DATACENTER = 2

CITY_CODE = re.compile(r"^[a-z0-9_]+$")
DATACENTER_ID = re.compile(r"^[a-z0-9-]+$")
VOUCHER_PREFIX = re.compile(r"^[A-Z]{2,4}$")
# A company id is the registration id the city knows it by: anything printable
# without ':' (the role separator) or whitespace.
COMPANY_ID = re.compile(r"^[^:\s]{1,128}$")


class SeedError(ValueError):
    """A file under DEPLOY_DIR does not describe a city or data centre."""


# ---------------------------------------------------------------- routing


def split_routing_key(routing_key: str) -> tuple[str, str] | None:
    """``shanghai.voucher_issued`` → ``("shanghai", "voucher_issued")``.

    None when the key is not ``<city>.<event>`` with an event the registry reads.
    """
    parts = routing_key.split(".")
    if len(parts) != 2:
        return None
    city, event = parts
    if not CITY_CODE.match(city) or event not in REGISTRY_EVENTS:
        return None
    return city, event


class RejectedEvent(ValueError):
    """A federation message the registry drops (it is logged, not retried)."""


def decode_event(routing_key: str, body: bytes) -> tuple[str, dict[str, Any]]:
    """Routing key and body bytes → ``(event, loaded body)``, or RejectedEvent.

    The routing key names the publishing city (RabbitMQ topic permissions
    allow a city only ``<its code>.*``), so a body naming another city is
    refused: no city can move another's figures.
    """
    parsed = split_routing_key(routing_key)
    if parsed is None:
        raise RejectedEvent(f"routing key {routing_key!r} is not <city>.<event>")
    key_city, event = parsed
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RejectedEvent(f"{routing_key}: body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RejectedEvent(f"{routing_key}: body is not a JSON object")
    try:
        loaded = load_event(event, data)
    except ValidationError as exc:
        raise RejectedEvent(f"{routing_key}: {exc.messages}") from exc
    _check_lengths(routing_key, loaded)
    if loaded["city"] != key_city:
        raise RejectedEvent(
            f"{routing_key}: body names city {loaded['city']!r}, "
            f"routing key {key_city!r}"
        )
    return event, loaded


# Column widths of models.py: a longer value would fail the insert on every
# redelivery, so it is refused here instead of looping through the queue.
_MAX_LENGTHS = {
    "city": 64,
    "event_id": 128,
    "voucher_code": 64,
    "program_id": 128,
    "id": 128,
    "name": 200,
    "region": 64,
    "voucher_prefix": 8,
    "rules_version": 64,
}


def _check_lengths(routing_key: str, body: Mapping[str, Any]) -> None:
    items = [body, *(body.get("programs") or [])]
    for item in items:
        for key, limit in _MAX_LENGTHS.items():
            value = item.get(key)
            if isinstance(value, str) and len(value) > limit:
                raise RejectedEvent(f"{routing_key}: {key} longer than {limit}")


# ---------------------------------------------------------------- read model


@dataclass(frozen=True)
class LedgerDelta:
    """How one federation event moves the money of a program and its city."""

    committed_fen: int = 0
    redeemed_fen: int = 0
    released_fen: int = 0
    vouchers_issued: int = 0

    @property
    def is_zero(self) -> bool:
        return not (
            self.committed_fen
            or self.redeemed_fen
            or self.released_fen
            or self.vouchers_issued
        )


def ledger_delta(event: str, body: Mapping[str, Any]) -> LedgerDelta:
    """The effect of a loaded federation event on the read model.

    Issuing commits the face value; a redemption moves the subsidy from
    committed to redeemed (negative for the reversal half of a correction);
    a release returns the unspent balance to the budget.
    """
    if event == "voucher_issued":
        face = body["face_value_fen"]
        return LedgerDelta(committed_fen=face, vouchers_issued=1)
    if event == "voucher_redeemed":
        subsidy = body["subsidy_fen"]
        return LedgerDelta(committed_fen=-subsidy, redeemed_fen=subsidy)
    if event == "voucher_released":
        released = body["released_fen"]
        return LedgerDelta(committed_fen=-released, released_fen=released)
    return LedgerDelta()


def available_fen(budget_fen: int, committed_fen: int, redeemed_fen: int) -> int:
    """DESIGN.md §5 invariant 1: ``available + committed + redeemed = budget``."""
    return budget_fen - committed_fen - redeemed_fen


def heartbeat_moment(occurred_at: datetime, received_at: datetime) -> datetime:
    """When a heartbeat says the city was alive: its own time, never in our future.

    A city's clock may run ahead of ours; the store keeps the latest moment
    seen, so a backlog of old heartbeats replayed after an outage does not move
    ``last_heartbeat_at`` backwards.
    """
    return min(occurred_at, received_at)


def city_status(
    last_heartbeat_at: datetime | None, now: datetime, stale_after_s: float
) -> str:
    """``live`` if heard from within ``stale_after_s``, then ``stale``;
    ``unknown`` if never heard from."""
    if last_heartbeat_at is None:
        return "unknown"
    if (now - last_heartbeat_at).total_seconds() <= stale_after_s:
        return "live"
    return "stale"


# ---------------------------------------------------------------- state


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

    @property
    def gpus(self) -> int:
        return sum(item.count for item in self.inventory)


def _ts(moment: datetime | None) -> str | None:
    return format_ts(moment) if moment is not None else None


def program_view(program: ProgramState) -> dict[str, Any]:
    return {
        "id": program.id,
        "kind": program.kind,
        "budget_fen": program.budget_fen,
        "rate_bp": program.rate_bp,
        "rules_version": program.rules_version,
        "rules_sha256": program.rules_sha256,
        "available_fen": available_fen(
            program.budget_fen, program.committed_fen, program.redeemed_fen
        ),
        "committed_fen": program.committed_fen,
        "redeemed_fen": program.redeemed_fen,
        "released_fen": program.released_fen,
    }


def city_view(city: CityState, now: datetime, stale_after_s: float) -> dict[str, Any]:
    """The City of docs/ARCHITECTURE.md.

    The city's money is kept apart from its programs' so that an event whose
    program is not (yet) known still counts for the city; its budget is the
    sum of the programs' it published.
    """
    budget = sum(program.budget_fen for program in city.programs)
    return {
        "code": city.code,
        "name": city.name,
        "region": city.region,
        "voucher_prefix": city.voucher_prefix,
        "status": city_status(city.last_heartbeat_at, now, stale_after_s),
        "last_heartbeat_at": _ts(city.last_heartbeat_at),
        "budget_fen": budget,
        "available_fen": available_fen(budget, city.committed_fen, city.redeemed_fen),
        "committed_fen": city.committed_fen,
        "redeemed_fen": city.redeemed_fen,
        "released_fen": city.released_fen,
        "vouchers_issued": city.vouchers_issued,
        "programs": [
            program_view(program)
            for program in sorted(city.programs, key=lambda p: p.id)
        ],
    }


def voucher_prefixes(cities: Iterable[CityState]) -> dict[str, str]:
    return {city.voucher_prefix: city.code for city in cities if city.voucher_prefix}


# ---------------------------------------------------------------- utilisation


def _ratio(used: int, capacity: int) -> float | None:
    return used / capacity if capacity > 0 else None


def _used_within_capacity(figures: Mapping[str, Any]) -> int:
    """A data centre's used GPU-seconds in the window, at most its capacity.

    Metering caps each data centre's utilisation at 1 (usage is bucketed by
    the hour a job started, capacity by the second, so a window's edge can
    overshoot); the sums over a region or the nation must agree with that, or
    one data centre's overshoot would inflate everyone's figure.
    """
    used = figures.get("gpu_seconds_window") or 0
    capacity = figures.get("capacity_gpu_seconds_window") or 0
    return min(used, capacity)


def datacenter_view(
    datacenter: DatacenterState, overview: Mapping[str, Any] | None
) -> dict[str, Any]:
    """CONTRACTS.md §7 Datacenter; ``utilisation`` null when metering is silent."""
    usage = (overview or {}).get("datacenters", {}).get(datacenter.id) or {}
    return {
        "id": datacenter.id,
        "name": datacenter.name,
        "operator": datacenter.operator,
        "city": datacenter.city,
        "hub_region": datacenter.hub_region,
        "government_run": datacenter.government_run,
        "inventory": [
            {
                "gpu_model": item.gpu_model,
                "count": item.count,
                "chip_origin": item.chip_origin,
                "price_fen_per_gpu_hour": item.price_fen_per_gpu_hour,
            }
            for item in datacenter.inventory
        ],
        "utilisation": usage.get("utilisation_window"),
    }


def network_summary(
    cities: Iterable[CityState],
    datacenters: Iterable[DatacenterState],
    overview: Mapping[str, Any] | None,
    now: datetime,
    stale_after_s: float,
) -> dict[str, Any]:
    """CONTRACTS.md §7 network summary.

    Money is the read model's; GPU-seconds (all time) and utilisation (the
    window metering was asked for: GPU-seconds used ÷ GPU-seconds of reported
    capacity) are metering's, and null when metering did not answer.
    """
    views = [city_view(city, now, stale_after_s) for city in cities]
    datacenters = list(datacenters)
    usage = (overview or {}).get("datacenters", {}) if overview is not None else None

    regions: dict[str, dict[str, Any]] = {}
    for datacenter in datacenters:
        region = regions.setdefault(
            datacenter.hub_region,
            {"datacenters": 0, "gpus": 0, "_used": 0, "_capacity": 0, "_total": 0},
        )
        region["datacenters"] += 1
        region["gpus"] += datacenter.gpus
        figures = (usage or {}).get(datacenter.id) or {}
        region["_total"] += figures.get("gpu_seconds_total") or 0
        region["_used"] += _used_within_capacity(figures)
        region["_capacity"] += figures.get("capacity_gpu_seconds_window") or 0

    def finish(region: dict[str, Any]) -> dict[str, Any]:
        used, capacity, total = (
            region.pop("_used"),
            region.pop("_capacity"),
            region.pop("_total"),
        )
        region["gpu_seconds"] = total if usage is not None else None
        region["utilisation"] = _ratio(used, capacity) if usage is not None else None
        return region

    if usage is not None:
        # Every data centre metering knows, registered here or not: the total
        # must not shrink because the registry lags behind a registration.
        gpu_seconds = sum(
            (f or {}).get("gpu_seconds_total") or 0 for f in usage.values()
        )
        used = sum(_used_within_capacity(f or {}) for f in usage.values())
        capacity = sum(
            (f or {}).get("capacity_gpu_seconds_window") or 0 for f in usage.values()
        )
        utilisation = _ratio(used, capacity)
    else:
        gpu_seconds = utilisation = None

    return {
        "cities": len(views),
        "live_cities": sum(1 for view in views if view["status"] == "live"),
        "datacenters": len(datacenters),
        "budget_fen": sum(view["budget_fen"] for view in views),
        "available_fen": sum(view["available_fen"] for view in views),
        "committed_fen": sum(view["committed_fen"] for view in views),
        "redeemed_fen": sum(view["redeemed_fen"] for view in views),
        "released_fen": sum(view["released_fen"] for view in views),
        "gpu_seconds": gpu_seconds,
        "utilisation": utilisation,
        "regions": {name: finish(region) for name, region in sorted(regions.items())},
    }


# ---------------------------------------------------------------- roles, tokens


def validate_role(role: Any) -> str:
    """A role of CONTRACTS.md §7, or ``InvalidRequest invalid_role``."""
    if isinstance(role, str):
        parts = role.split(":")
        kind = parts[0]
        if kind == "national_admin" and len(parts) == 1:
            return role
        if kind == "city_admin" and len(parts) == 2 and CITY_CODE.match(parts[1]):
            return role
        if (
            kind == "company"
            and len(parts) == 3
            and CITY_CODE.match(parts[1])
            and COMPANY_ID.match(parts[2])
        ):
            return role
        if kind == "datacenter" and len(parts) == 2 and DATACENTER_ID.match(parts[1]):
            return role
    raise InvalidRequest(
        "invalid_role",
        f"{role!r} is not a role: national_admin, city_admin:<city>, "
        "company:<city>:<company_id> or datacenter:<id>",
        {"role": role if isinstance(role, str) else repr(role)},
    )


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """Tokens are stored as their SHA-256 only: a leaked table grants nothing."""
    return hashlib.sha256(token.encode()).hexdigest()


def keys_to_revoke(active_key_ids_newest_first: list[str]) -> list[str]:
    """After issuing a key, all but the newest two active keys are revoked."""
    return active_key_ids_newest_first[ACTIVE_KEYS_PER_DATACENTER:]


# ---------------------------------------------------------------- seed files


def _required(data: Mapping[str, Any], key: str, where: str) -> Any:
    value = data.get(key)
    if value is None or value == "":
        raise SeedError(f"{where}: missing '{key}'")
    return value


def parse_city_seed(data: Any, where: str) -> CityState:
    """A city from its rules file: only what the registry lists (no programs).

    The program rules are the city's own business and are validated by its
    voucher service; budgets reach the registry by ``program_published``.
    """
    if not isinstance(data, Mapping):
        raise SeedError(f"{where}: top level must be a mapping")
    code = str(_required(data, "city", where))
    if not CITY_CODE.match(code):
        raise SeedError(f"{where}: city code {code!r} must match [a-z0-9_]+")
    prefix = data.get("voucher_prefix")
    if prefix is not None and not VOUCHER_PREFIX.match(str(prefix)):
        raise SeedError(f"{where}: voucher_prefix {prefix!r} must be 2-4 capitals")
    region = data.get("region")
    return CityState(
        code=code,
        name=str(data.get("name") or code),
        region=str(region) if region is not None else None,
        voucher_prefix=str(prefix) if prefix is not None else None,
    )


def parse_datacenter_seeds(data: Any, where: str) -> list[DatacenterState]:
    """``datacenters.yaml``: ``{datacenters: [{id, name, operator, …}]}``."""
    if data is None:
        return []
    if not isinstance(data, Mapping) or not isinstance(
        data.get("datacenters", []), list
    ):
        raise SeedError(f"{where}: expected a mapping with a 'datacenters' list")
    seeds = []
    seen: set[str] = set()
    for index, entry in enumerate(data.get("datacenters") or []):
        at = f"{where}: datacenters[{index}]"
        if not isinstance(entry, Mapping):
            raise SeedError(f"{at}: must be a mapping")
        dc_id = str(_required(entry, "id", at))
        if not DATACENTER_ID.match(dc_id):
            raise SeedError(f"{at}: id {dc_id!r} must match [a-z0-9-]+")
        if dc_id in seen:
            raise SeedError(f"{at}: duplicate id {dc_id!r}")
        seen.add(dc_id)
        government_run = entry.get("government_run", False)
        if not isinstance(government_run, bool):
            raise SeedError(f"{at}: government_run must be true or false")
        inventory = []
        for item_index, item in enumerate(entry.get("inventory") or []):
            item_at = f"{at}.inventory[{item_index}]"
            if not isinstance(item, Mapping):
                raise SeedError(f"{item_at}: must be a mapping")
            count = _required(item, "count", item_at)
            price = _required(item, "price_fen_per_gpu_hour", item_at)
            origin = _required(item, "chip_origin", item_at)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise SeedError(f"{item_at}: count must be a whole number ≥ 0")
            if not isinstance(price, int) or isinstance(price, bool) or price < 0:
                raise SeedError(
                    f"{item_at}: price_fen_per_gpu_hour must be whole fen ≥ 0"
                )
            if origin not in ("domestic", "imported"):
                raise SeedError(f"{item_at}: chip_origin must be domestic or imported")
            inventory.append(
                InventoryItem(
                    gpu_model=str(_required(item, "gpu_model", item_at)),
                    count=count,
                    chip_origin=origin,
                    price_fen_per_gpu_hour=price,
                )
            )
        seeds.append(
            DatacenterState(
                id=dc_id,
                name=str(_required(entry, "name", at)),
                operator=str(_required(entry, "operator", at)),
                city=str(_required(entry, "city", at)),
                hub_region=str(_required(entry, "hub_region", at)),
                government_run=government_run,
                inventory=inventory,
            )
        )
    return seeds
