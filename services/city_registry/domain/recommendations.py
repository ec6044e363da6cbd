"""Where to run a job: data centres offering a GPU model, cheapest net cost
first, priced with the voucher's program terms exactly as its city will book
them (``services/common/terms.py``, read from the city's ``program_published``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.city_registry.domain.state import DatacenterState, ProgramState
from services.city_registry.domain.usage import datacenter_usage, spare_gpus
from services.common.terms import (
    ProgramTerms,
    rate_at,
    subsidy_fen,
    terms_from_wire,
)
from services.common.units import (
    apply_rate_fen,
    format_cny_amount,
    format_rate,
    gpu_seconds_of,
    rate_cost_fen,
)


@dataclass(frozen=True)
class VoucherTerms:
    """What a voucher's program pays, from the city's ``program_published``."""

    city: str
    program_id: str
    terms: ProgramTerms
    balance_fen: int | None = None
    terms_published: bool = False


def voucher_terms(
    city: str, program: ProgramState, balance_fen: int | None
) -> VoucherTerms:
    """The terms of ``program`` (its rate and, if the city publishes them, cap,
    bonuses and scope), with the voucher's balance."""
    published = program.terms or {}
    return VoucherTerms(
        city=city,
        program_id=program.id,
        terms=terms_from_wire({**published, "rate_bp": program.rate_bp}),
        balance_fen=balance_fen,
        terms_published=bool(published),
    )


def _priced(
    voucher: VoucherTerms, attrs: Mapping[str, Any], cost: int
) -> tuple[int, int, list[str]]:
    """Rate, subsidy and why, in words, at a data centre the voucher admits."""
    rate = rate_at(voucher.terms, attrs)
    why = [f"{voucher.city} rate {format_rate(rate.base_bp)}"]
    why += [
        f"+{format_rate(bonus.add_bp)} bonus ({bonus.describe()})"
        for bonus in rate.bonuses
    ]
    if rate.capped_at_bp is not None:
        why.append(f"capped at {format_rate(rate.capped_at_bp)}")
    if not voucher.terms_published:
        why.append(f"{voucher.city} publishes no bonuses: rate only")
    subsidy = subsidy_fen(cost, rate.bp, voucher.balance_fen)
    if subsidy < apply_rate_fen(cost, rate.bp):
        why.append("limited by the voucher's balance")
    return rate.bp, subsidy, why


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
    gpu_seconds = gpu_seconds_of(gpus, hours)
    ranked = []
    for dc in datacenters:
        if dc.removed:
            continue
        item = next((i for i in dc.inventory if i.gpu_model == gpu_model), None)
        if item is None:
            continue
        utilisation = datacenter_usage(overview, dc.id).get("utilisation_window")
        spare = spare_gpus(item.count, utilisation)
        cost = rate_cost_fen(gpu_seconds, item.price_fen_per_gpu_hour)
        attrs = {
            "government_run": dc.government_run,
            "hub_region": dc.hub_region,
            "chip_origin": item.chip_origin,
            "utilisation": utilisation,
        }
        reasons = [
            f"{format_cny_amount(item.price_fen_per_gpu_hour)} CNY per "
            f"{gpu_model}-hour",
            f"{spare} of {item.count} {gpu_model} spare (24 h utilisation "
            + (f"{utilisation:.0%})" if utilisation is not None else "unknown)"),
        ]
        rate, subsidy, eligible = 0, 0, True
        if terms is not None:
            if terms.terms.datacenters.admits(dc.id, attrs):
                rate, subsidy, why = _priced(terms, attrs, cost)
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
