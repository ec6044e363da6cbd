"""The shapes the registry answers with: City, Datacenter, the network summary,
the public view and the national admin's overview (docs/ARCHITECTURE.md,
CONTRACTS.md §7), computed from the read model and metering's figures."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.city_registry.domain.state import (
    REMOVED,
    CityState,
    DatacenterState,
    ProgramState,
)
from services.city_registry.domain.usage import (
    UsageTotals,
    datacenter_usage,
    spare_gpus,
)
from services.common.units import format_ts


def available_fen(budget_fen: int, committed_fen: int, redeemed_fen: int) -> int:
    """DESIGN.md §5 invariant 1: ``available + committed + redeemed = budget``."""
    return budget_fen - committed_fen - redeemed_fen


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


def timestamp(moment: datetime | None) -> str | None:
    """A moment as the registry answers it: ISO 8601 with ``Z``, or None."""
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
        "vouchers_active": program.vouchers_active,
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
        "last_heartbeat_at": timestamp(city.last_heartbeat_at),
        "budget_fen": budget,
        "available_fen": available_fen(budget, city.committed_fen, city.redeemed_fen),
        "committed_fen": city.committed_fen,
        "redeemed_fen": city.redeemed_fen,
        "released_fen": city.released_fen,
        "vouchers_issued": city.vouchers_issued,
        "vouchers_active": city.vouchers_active,
        "programs": [
            program_view(program)
            for program in sorted(city.programs, key=lambda p: p.id)
        ],
    }


def voucher_prefixes(cities: Iterable[CityState]) -> dict[str, str]:
    return {city.voucher_prefix: city.code for city in cities if city.voucher_prefix}


def datacenter_view(
    datacenter: DatacenterState, overview: Mapping[str, Any] | None
) -> dict[str, Any]:
    """CONTRACTS.md §7 Datacenter; ``utilisation`` null when metering is silent."""
    usage = datacenter_usage(overview, datacenter.id)
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


@dataclass(frozen=True)
class Snapshot:
    """One read of the read model, at one moment: every part of a national
    answer is computed from the same one, so that a summary is always the sum
    of the cities shown beside it."""

    cities: tuple[CityState, ...]
    datacenters: tuple[DatacenterState, ...]
    now: datetime
    stale_after_s: float

    @classmethod
    def of(
        cls,
        cities: Iterable[CityState],
        datacenters: Iterable[DatacenterState],
        now: datetime,
        stale_after_s: float,
    ) -> Snapshot:
        return cls(tuple(cities), tuple(datacenters), now, stale_after_s)

    def city_views(self) -> list[dict[str, Any]]:
        return [city_view(city, self.now, self.stale_after_s) for city in self.cities]


# A city's money, summed over the nation by the summary.
_MONEY = (
    "budget_fen",
    "available_fen",
    "committed_fen",
    "redeemed_fen",
    "released_fen",
)


def _sums(rows: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, Any]:
    rows = list(rows)
    return {key: sum(row[key] for row in rows) for key in keys}


def network_summary(
    snapshot: Snapshot, overview: Mapping[str, Any] | None
) -> dict[str, Any]:
    """CONTRACTS.md §7 network summary.

    Money is the read model's; GPU-seconds (all time) and utilisation (the
    window metering was asked for: GPU-seconds used ÷ GPU-seconds of reported
    capacity) are metering's, and null when metering did not answer.
    """
    views = snapshot.city_views()
    datacenters = snapshot.datacenters
    usage = (overview or {}).get("datacenters", {}) if overview is not None else None

    known = usage is not None
    regions: defaultdict[str, UsageTotals] = defaultdict(UsageTotals)
    for datacenter in datacenters:
        figures = (usage or {}).get(datacenter.id) or {}
        regions[datacenter.hub_region].add(figures, gpus=datacenter.gpus)

    gpu_seconds = utilisation = None
    if known:
        # Every data centre metering knows, registered here or not: the total
        # must not shrink because the registry lags behind a registration.
        nation = UsageTotals()
        for figures in usage.values():
            nation.add(figures or {})
        gpu_seconds, utilisation = nation.gpu_seconds, nation.utilisation()

    return {
        "cities": len(views),
        "live_cities": sum(1 for view in views if view["status"] == "live"),
        "datacenters": len(datacenters),
        **_sums(views, _MONEY),
        "gpu_seconds": gpu_seconds,
        "utilisation": utilisation,
        "regions": {
            name: {
                "datacenters": region.datacenters,
                "gpus": region.gpus,
                "gpu_seconds": region.gpu_seconds if known else None,
                "utilisation": region.utilisation() if known else None,
            }
            for name, region in sorted(regions.items())
        },
    }


def public_view(
    snapshot: Snapshot, overview: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Everything anyone may read, as one consistent snapshot: the summary and
    every city's page."""
    return {
        "summary": network_summary(snapshot, overview),
        "cities": snapshot.city_views(),
    }


# A city's figures that the overview lists per city and totals over them.
_CITY_FIGURES = (*_MONEY, "vouchers_issued", "vouchers_active")


def national_overview(
    snapshot: Snapshot,
    day: Mapping[str, Any] | None,
    week: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The national admin's view: per city money and vouchers; per data centre
    and hub region GPU-seconds, utilisation over 24 h and 7 d, spare GPUs;
    totals. Utilisation of a group = used ÷ capacity, each used capped at its
    capacity (see ``usage.used_within_capacity``)."""
    city_rows = [
        {key: view[key] for key in ("code", "name", "status", *_CITY_FIGURES)}
        for view in snapshot.city_views()
    ]
    dc_rows = []
    regions: defaultdict[str, UsageTotals] = defaultdict(lambda: UsageTotals(2))
    for dc in snapshot.datacenters:
        d, w = datacenter_usage(day, dc.id), datacenter_usage(week, dc.id)
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
        regions[dc.hub_region].add(d, w, gpus=dc.gpus, spare_gpus=row["spare_gpus"])

    totals = _sums(city_rows, _CITY_FIGURES) | {
        "cities": len(city_rows),
        "live_cities": sum(1 for row in city_rows if row["status"] == "live"),
        "datacenters": len(dc_rows),
        **_sums(dc_rows, ("gpus", "spare_gpus", "gpu_seconds")),
    }
    return {
        "as_of": format_ts(snapshot.now),
        "totals": totals,
        "cities": city_rows,
        "datacenters": dc_rows,
        "regions": {
            name: {
                "datacenters": region.datacenters,
                "gpus": region.gpus,
                "spare_gpus": region.spare_gpus,
                "gpu_seconds": region.gpu_seconds,
                "utilisation_24h": region.utilisation(0),
                "utilisation_7d": region.utilisation(1),
            }
            for name, region in sorted(regions.items())
        },
    }
