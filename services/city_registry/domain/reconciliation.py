"""Is the read model the sum of the cities' ledgers (DESIGN.md §5, invariant 5)?
Every figure where it is not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.city_registry.domain.state import CityState

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
