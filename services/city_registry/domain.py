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

from services.common.contracts import CITY_CODE, load_event
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
REMOVED = "removed"  # the status of a city the national admin removed

# Two keys stay active so that a data centre can roll its gateway onto the new
# one while messages signed with the old one are still in flight.
ACTIVE_KEYS_PER_DATACENTER = 2

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
        "vouchers_issued": program.vouchers_issued,
        "vouchers_active": program.vouchers_issued - program.vouchers_closed,
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
        "status": REMOVED
        if city.removed_at is not None
        else city_status(city.last_heartbeat_at, now, stale_after_s),
        "last_heartbeat_at": _ts(city.last_heartbeat_at),
        "budget_fen": budget,
        "available_fen": available_fen(budget, city.committed_fen, city.redeemed_fen),
        "committed_fen": city.committed_fen,
        "redeemed_fen": city.redeemed_fen,
        "released_fen": city.released_fen,
        "vouchers_issued": city.vouchers_issued,
        "vouchers_active": city.vouchers_issued - city.vouchers_closed,
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
    # The usage metering compares with capacity (from the hour its reports
    # began); older metering answers only carry the whole window's.
    used = figures.get("gpu_seconds_covered", figures.get("gpu_seconds_window")) or 0
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


def public_view(
    cities: Iterable[CityState],
    datacenters: Iterable[DatacenterState],
    overview: Mapping[str, Any] | None,
    now: datetime,
    stale_after_s: float,
) -> dict[str, Any]:
    """Everything anyone may read, as one consistent snapshot: the summary and
    every city's page, computed from the same read of the read model, so that
    the summary is always the sum of the cities shown beside it."""
    cities = list(cities)
    return {
        "summary": network_summary(cities, datacenters, overview, now, stale_after_s),
        "cities": [city_view(city, now, stale_after_s) for city in cities],
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


# ---------------------------------------------------------------- federation (issue 6)


def check_city_admission(code: Any, name: Any) -> tuple[str, str]:
    """A city code and display name fit to admit, or ``InvalidRequest``."""
    if not isinstance(code, str) or not CITY_CODE.match(code) or len(code) > 48:
        raise InvalidRequest(
            "invalid_city", "code must match [a-z0-9_]+ (≤ 48 chars)", {"code": code}
        )
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidRequest("invalid_city", "name must be 1–200 chars", {"name": name})
    return code, name.strip()


def parse_datacenter_registration(data: Any) -> DatacenterState:
    """One data centre as the national admin registers it (the seed-file shape)."""
    if not isinstance(data, Mapping) or not data.get("inventory"):
        raise InvalidRequest(
            "invalid_datacenter", "a data centre needs an id and a non-empty inventory"
        )
    try:
        (datacenter,) = parse_datacenter_seeds({"datacenters": [data]}, "datacenter")
    except SeedError as exc:
        raise InvalidRequest("invalid_datacenter", str(exc)) from None
    if len(datacenter.id) > 48:
        raise InvalidRequest("invalid_datacenter", "id longer than 48 chars")
    models = [item.gpu_model for item in datacenter.inventory]
    if len(set(models)) != len(models):
        raise InvalidRequest("invalid_datacenter", "a GPU model is listed twice")
    return datacenter


def program_terms(program: Mapping[str, Any]) -> dict[str, Any] | None:
    """The optional terms a ``program_published`` program carries, or None."""
    terms = {
        key: program.get(key)
        for key in ("max_rate_bp", "bonuses", "datacenters")
        if program.get(key) is not None
    }
    return terms or None


def vouchers_active(city_or_program: Any) -> int:
    return city_or_program.vouchers_issued - city_or_program.vouchers_closed


def spare_gpus(gpus: int, utilisation: float | None) -> int:
    """GPUs free on average over the last 24 h; all of them if never measured."""
    if utilisation is None:
        return gpus
    return max(0, round(gpus * (1 - min(utilisation, 1.0))))


def _dc_usage(overview: Mapping[str, Any] | None, dc_id: str) -> Mapping[str, Any]:
    return ((overview or {}).get("datacenters") or {}).get(dc_id) or {}


def national_overview(
    cities: Iterable[CityState],
    datacenters: Iterable[DatacenterState],
    day: Mapping[str, Any] | None,
    week: Mapping[str, Any] | None,
    now: datetime,
    stale_after_s: float,
) -> dict[str, Any]:
    """The national admin's view: per city money and vouchers; per data centre
    and hub region GPU-seconds, utilisation over 24 h and 7 d, spare GPUs;
    totals. Utilisation of a group = used ÷ capacity, each used capped at its
    capacity (see ``_used_within_capacity``)."""
    city_rows = []
    for city in cities:
        view = city_view(city, now, stale_after_s)
        city_rows.append(
            {
                key: view[key]
                for key in (
                    "code",
                    "name",
                    "status",
                    "budget_fen",
                    "available_fen",
                    "committed_fen",
                    "redeemed_fen",
                    "released_fen",
                    "vouchers_issued",
                )
            }
            | {"vouchers_active": vouchers_active(city)}
        )
    dc_rows, regions = [], {}
    for dc in datacenters:
        d, w = _dc_usage(day, dc.id), _dc_usage(week, dc.id)
        row = {
            "id": dc.id,
            "hub_region": dc.hub_region,
            "government_run": dc.government_run,
            "removed": dc.removed,
            "gpus": dc.gpus,
            "gpu_seconds": d.get("gpu_seconds_total") or 0,
            "gpu_seconds_24h": d.get("gpu_seconds_window") or 0,
            "gpu_seconds_7d": w.get("gpu_seconds_window") or 0,
            "utilisation_24h": d.get("utilisation_window"),
            "utilisation_7d": w.get("utilisation_window"),
        }
        row["spare_gpus"] = (
            0 if dc.removed else spare_gpus(dc.gpus, row["utilisation_24h"])
        )
        dc_rows.append(row)
        region = regions.setdefault(
            dc.hub_region,
            {
                "datacenters": 0,
                "gpus": 0,
                "spare_gpus": 0,
                "gpu_seconds": 0,
                "_u24": 0,
                "_c24": 0,
                "_u7": 0,
                "_c7": 0,
            },
        )
        region["datacenters"] += 1
        region["gpus"] += dc.gpus
        region["spare_gpus"] += row["spare_gpus"]
        region["gpu_seconds"] += row["gpu_seconds"]
        region["_u24"] += _used_within_capacity(d)
        region["_c24"] += d.get("capacity_gpu_seconds_window") or 0
        region["_u7"] += _used_within_capacity(w)
        region["_c7"] += w.get("capacity_gpu_seconds_window") or 0

    def finish(region: dict[str, Any]) -> dict[str, Any]:
        u24, c24, u7, c7 = (region.pop(k) for k in ("_u24", "_c24", "_u7", "_c7"))
        region["utilisation_24h"] = _ratio(u24, c24)
        region["utilisation_7d"] = _ratio(u7, c7)
        return region

    totals = {
        key: sum(row[key] for row in city_rows)
        for key in (
            "budget_fen",
            "available_fen",
            "committed_fen",
            "redeemed_fen",
            "released_fen",
            "vouchers_issued",
            "vouchers_active",
        )
    } | {
        "cities": len(city_rows),
        "live_cities": sum(1 for row in city_rows if row["status"] == "live"),
        "datacenters": len(dc_rows),
        "gpus": sum(row["gpus"] for row in dc_rows),
        "spare_gpus": sum(row["spare_gpus"] for row in dc_rows),
        "gpu_seconds": sum(row["gpu_seconds"] for row in dc_rows),
    }
    return {
        "as_of": format_ts(now),
        "totals": totals,
        "cities": city_rows,
        "datacenters": dc_rows,
        "regions": {name: finish(r) for name, r in sorted(regions.items())},
    }


# ---------------------------------------------------------------- reconciliation

RECONCILED_FIELDS = (
    "budget_fen",
    "committed_fen",
    "redeemed_fen",
    "released_fen",
    "vouchers_issued",
)


def ledger_drift(city: CityState, totals: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every figure where the read model differs from the city's own ledger
    (``vouchers_<city>.ledger_totals()``), per program and for the city."""
    drift = []
    ours = {program.id: program for program in city.programs}
    theirs = {p["program_id"]: p for p in totals.get("programs") or []}
    for program_id in sorted(set(ours) | set(theirs)):
        mine, ledger = ours.get(program_id), theirs.get(program_id)
        for key in RECONCILED_FIELDS:
            a = getattr(mine, key, 0) if mine is not None else 0
            b = (ledger or {}).get(key, 0) or 0
            if a != b:
                drift.append(
                    {
                        "city": city.code,
                        "program_id": program_id,
                        "field": key,
                        "registry": a,
                        "ledger": b,
                        "difference": a - b,
                    }
                )
    for key in RECONCILED_FIELDS[1:]:
        a = getattr(city, key)
        b = sum((p.get(key) or 0) for p in theirs.values())
        if a != b:
            drift.append(
                {
                    "city": city.code,
                    "program_id": None,
                    "field": key,
                    "registry": a,
                    "ledger": b,
                    "difference": a - b,
                }
            )
    return drift


# ---------------------------------------------------------------- recommendations


@dataclass(frozen=True)
class VoucherTerms:
    """What a voucher's program pays, from the city's ``program_published``."""

    city: str
    program_id: str
    rate_bp: int
    max_rate_bp: int | None = None
    bonuses: tuple[dict[str, Any], ...] = ()
    datacenters: Any = "any"
    balance_fen: int | None = None
    terms_published: bool = False


def _condition_holds(attrs: Mapping[str, Any], key: str, wanted: Any) -> bool:
    if key == "utilisation_below_percent":
        actual = attrs.get("utilisation")
        return actual is not None and actual * 100 < wanted
    return attrs.get(key) == wanted


def scope_admits(scope: Any, dc_id: str, attrs: Mapping[str, Any]) -> bool:
    """The rules file's ``datacenters``: ``any`` | [ids] | {hub_region, …, exclude}."""
    if scope in (None, "any"):
        return True
    if isinstance(scope, list):
        return dc_id in scope
    if isinstance(scope, Mapping):
        if dc_id in (scope.get("exclude") or []):
            return False
        ids = scope.get("ids")
        if ids is not None and dc_id not in ids:
            return False
        return all(
            scope.get(key) is None or attrs.get(key) == scope.get(key)
            for key in ("hub_region", "government_run", "chip_origin")
        )
    return False


def effective_rate(
    terms: VoucherTerms, attrs: Mapping[str, Any]
) -> tuple[int, list[str]]:
    """Rate plus applicable bonuses, capped; and why, in words."""
    rate, why = terms.rate_bp, [f"{terms.city} rate {terms.rate_bp / 100:g} %"]
    for bonus in terms.bonuses:
        when = bonus.get("when") or {}
        if all(_condition_holds(attrs, k, v) for k, v in when.items()):
            rate += int(bonus.get("add_bp") or 0)
            cond = ", ".join(f"{k}={v}" for k, v in when.items())
            why.append(f"+{int(bonus.get('add_bp') or 0) / 100:g} % bonus ({cond})")
    if terms.max_rate_bp is not None and rate > terms.max_rate_bp:
        rate = terms.max_rate_bp
        why.append(f"capped at {terms.max_rate_bp / 100:g} %")
    if not terms.terms_published:
        why.append(f"{terms.city} publishes no bonuses: rate only")
    return rate, why


def recommend(
    datacenters: Iterable[DatacenterState],
    overview: Mapping[str, Any] | None,
    gpu_model: str,
    gpus: int,
    hours: float,
    terms: VoucherTerms | None = None,
) -> list[dict[str, Any]]:
    """Data centres offering ``gpu_model``, cheapest net cost first.

    Net cost = cost − subsidy, subsidy = ⌊cost × effective rate⌋ capped by the
    voucher's balance; ties (and equal costs) go to more spare GPUs, so demand
    flows to under-used centres. A centre the voucher may not be spent at is
    listed last with its full cost and the reason.
    """
    gpu_seconds = round(gpus * hours * 3600)
    ranked = []
    for dc in datacenters:
        if dc.removed:
            continue
        item = next((i for i in dc.inventory if i.gpu_model == gpu_model), None)
        if item is None:
            continue
        usage = _dc_usage(overview, dc.id)
        utilisation = usage.get("utilisation_window")
        spare = spare_gpus(item.count, utilisation)
        cost = (gpu_seconds * item.price_fen_per_gpu_hour * 2 + 3600) // 7200
        attrs = {
            "government_run": dc.government_run,
            "hub_region": dc.hub_region,
            "chip_origin": item.chip_origin,
            "utilisation": utilisation,
        }
        reasons = [
            f"{item.price_fen_per_gpu_hour / 100:.2f} CNY per {gpu_model}-hour",
            f"{spare} of {item.count} {gpu_model} spare (24 h utilisation "
            + (f"{utilisation:.0%})" if utilisation is not None else "unknown)"),
        ]
        rate, subsidy, eligible = 0, 0, True
        if terms is not None:
            if scope_admits(terms.datacenters, dc.id, attrs):
                rate, why = effective_rate(terms, attrs)
                subsidy = cost * rate // 10_000
                if terms.balance_fen is not None and subsidy > terms.balance_fen:
                    subsidy = terms.balance_fen
                    why.append("limited by the voucher's balance")
                reasons += why
            else:
                eligible = False
                reasons.append(f"{terms.program_id} vouchers may not be spent here")
        if gpus > spare:
            reasons.append(f"fewer spare GPUs than the {gpus} asked for")
        ranked.append(
            {
                "datacenter_id": dc.id,
                "name": dc.name,
                "hub_region": dc.hub_region,
                "government_run": dc.government_run,
                "gpu_model": gpu_model,
                "chip_origin": item.chip_origin,
                "price_fen_per_gpu_hour": item.price_fen_per_gpu_hour,
                "gpu_seconds": gpu_seconds,
                "cost_fen": cost,
                "rate_bp": rate,
                "subsidy_fen": subsidy,
                "net_cost_fen": cost - subsidy,
                "voucher_applies": terms is not None and eligible,
                "spare_gpus": spare,
                "utilisation": utilisation,
                "explanation": reasons,
            }
        )
    ranked.sort(
        key=lambda r: (
            r["spare_gpus"] < gpus,
            terms is not None and not r["voucher_applies"],
            r["net_cost_fen"],
            -r["spare_gpus"],
            r["datacenter_id"],
        )
    )
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    return ranked
