"""Cities and data centres as the registry admits them: the seed files under
``deploy/`` (a city's rules file, ``datacenters.yaml``) and the national
admin's admissions and registrations, checked and turned into plain data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.city_registry.domain import prefixes
from services.city_registry.domain.state import (
    DATACENTER_ID,
    CityState,
    DatacenterState,
    InventoryItem,
)
from services.common.contracts import CITY_CODE
from services.common.errors import InvalidRequest
from services.common.vouchercode import PREFIX


class SeedError(ValueError):
    """A file under DEPLOY_DIR does not describe a city or data centre."""


def _required(data: Mapping[str, Any], key: str, where: str) -> Any:
    value = data.get(key)
    if value is None or value == "":
        raise SeedError(f"{where}: missing '{key}'")
    return value


def parse_city_seed(data: Any, where: str) -> CityState:
    """A city from its rules file: only what the registry lists (no programs).

    Its ``voucher_prefix``, when the file names one, is the prefix it asks
    for: the registry reserves it if no other city holds it (``prefixes``).

    The program rules are the city's own business and are validated by its
    voucher service; budgets reach the registry by ``program_published``.
    """
    if not isinstance(data, Mapping):
        raise SeedError(f"{where}: top level must be a mapping")
    code = str(_required(data, "city", where))
    if not CITY_CODE.match(code):
        raise SeedError(f"{where}: city code {code!r} must match [a-z0-9_]+")
    prefix = data.get("voucher_prefix")
    if prefix is not None and not PREFIX.match(str(prefix)):
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
                # Optional (not in CONTRACTS.md §7): the city it stands in,
                # for people; null when not stated.
                city=str(entry["city"]) if entry.get("city") else None,
                hub_region=str(_required(entry, "hub_region", at)),
                government_run=government_run,
                inventory=inventory,
            )
        )
    return seeds


def check_city_admission(
    code: Any, name: Any, voucher_prefix: Any = None
) -> tuple[str, str, str | None]:
    """A city code, display name and requested voucher prefix (or None) fit
    to admit, or ``InvalidRequest``."""
    if not isinstance(code, str) or not CITY_CODE.match(code) or len(code) > 48:
        raise InvalidRequest(
            "invalid_city", "code must match [a-z0-9_]+ (≤ 48 chars)", {"code": code}
        )
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidRequest("invalid_city", "name must be 1–200 chars", {"name": name})
    return code, name.strip(), prefixes.check_requested(voucher_prefix)


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
