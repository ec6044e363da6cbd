"""A program's terms, written once: bonuses, where its vouchers may be spent, the
effective rate at a data centre and the subsidy of a cost.

The vouchers book subsidies with these rules (``services/vouchers/domain.py``
re-exports them) and the registry prices recommendations with the same ones
(``services/city_registry/domain/recommendations.py``), from the terms the city
publishes in ``program_published``: both directions of that wire form live
here, so what a city books and what the registry promises cannot drift apart.

Pure Python; money is integer fen and rates integer basis points, and every
product of the two goes through ``units.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.units import apply_rate_fen

# What a data centre is described by, for bonuses and scopes.
DATACENTER_ATTRIBUTES = ("government_run", "chip_origin", "hub_region")
# A bonus condition on the data centre's recent utilisation (0..1 in the rated
# record's ``datacenter.utilisation``): below this percentage, the bonus
# applies; when the attribute is missing the bonus does not apply.
UTILISATION_BELOW = "utilisation_below_percent"
# How a rules file and the wire write "no restriction".
ANY = "any"
# The keys of a ``program_published`` program that carry its terms beyond the
# rate (CONTRACTS.md §3 extensions).
TERMS_ON_THE_WIRE = ("max_rate_bp", "bonuses", "datacenters")


def _condition_holds(datacenter: Mapping[str, Any], key: str, wanted: Any) -> bool:
    if key == UTILISATION_BELOW:
        actual = datacenter.get("utilisation")
        return actual is not None and actual * 100 < wanted
    return datacenter.get(key) == wanted


@dataclass(frozen=True)
class Bonus:
    """``add_bp`` more subsidy when every condition in ``when`` holds."""

    when: tuple[tuple[str, Any], ...]
    add_bp: int

    def applies(self, datacenter: Mapping[str, Any]) -> bool:
        return all(_condition_holds(datacenter, k, v) for k, v in self.when)

    def describe(self) -> str:
        """``government_run=True, chip_origin=domestic``: the conditions, in words."""
        return ", ".join(f"{key}={wanted}" for key, wanted in self.when)


@dataclass(frozen=True)
class DatacenterScope:
    """Where a program's vouchers may be spent: anywhere, listed ids, a hub."""

    ids: frozenset[str] | None = None
    hub_region: str | None = None
    government_run: bool | None = None
    chip_origin: str | None = None
    exclude: frozenset[str] = frozenset()

    def admits(self, datacenter_id: str, datacenter: Mapping[str, Any]) -> bool:
        if self.ids is not None and datacenter_id not in self.ids:
            return False
        if datacenter_id in self.exclude:
            return False
        for key in DATACENTER_ATTRIBUTES:
            wanted = getattr(self, key)
            if wanted is not None and datacenter.get(key) != wanted:
                return False
        return True


ANYWHERE = DatacenterScope()
# What a scope the reader cannot make sense of admits: nothing.
NOWHERE = DatacenterScope(ids=frozenset())


class Terms(Protocol):
    """What prices a voucher's use: a vouchers ``Program`` or ``ProgramTerms``."""

    @property
    def rate_bp(self) -> int: ...

    @property
    def max_rate_bp(self) -> int | None: ...

    @property
    def bonuses(self) -> tuple[Bonus, ...]: ...

    @property
    def datacenters(self) -> DatacenterScope: ...


@dataclass(frozen=True)
class ProgramTerms:
    """A program's terms as another service reads them off the wire."""

    rate_bp: int
    max_rate_bp: int | None = None
    bonuses: tuple[Bonus, ...] = ()
    datacenters: DatacenterScope = ANYWHERE


@dataclass(frozen=True)
class Rate:
    """An effective rate and how it was reached, for explanations."""

    bp: int
    base_bp: int
    bonuses: tuple[Bonus, ...]  # those that applied, in the program's order
    capped_at_bp: int | None  # the maximum, when it cut the rate


def rate_at(terms: Terms, datacenter: Mapping[str, Any]) -> Rate:
    """Program rate plus every bonus that applies, capped by the maximum rate."""
    applied = tuple(b for b in terms.bonuses if b.applies(datacenter))
    rate = terms.rate_bp + sum(b.add_bp for b in applied)
    cap = terms.max_rate_bp
    if cap is not None and rate > cap:
        return Rate(cap, terms.rate_bp, applied, cap)
    return Rate(rate, terms.rate_bp, applied, None)


def effective_rate_bp(terms: Terms, datacenter: Mapping[str, Any]) -> int:
    """Program rate plus every bonus that applies, capped by the maximum rate."""
    return rate_at(terms, datacenter).bp


def subsidy_fen(
    cost_fen: int,
    rate_bp: int,
    balance_fen: int | None,
    committed_fen: int | None = None,
) -> int:
    """min(cost × rate rounded down, voucher balance, program's committed funds),
    never below zero; a limit that is None (not known) does not limit."""
    if cost_fen < 0:
        raise ValueError("cost must be non-negative")
    subsidy = apply_rate_fen(cost_fen, rate_bp)
    if balance_fen is not None and balance_fen < subsidy:
        subsidy = balance_fen
    if committed_fen is not None and committed_fen < subsidy:
        subsidy = committed_fen
    return max(0, subsidy)


# ---------------------------------------------------------------- the wire


def scope_to_wire(scope: DatacenterScope) -> Any:
    """A program's data-centre scope as the rules file writes it."""
    if scope == ANYWHERE:
        return ANY
    wire: dict[str, Any] = {}
    if scope.ids is not None:
        wire["ids"] = sorted(scope.ids)
    for key in ("hub_region", "government_run", "chip_origin"):
        if getattr(scope, key) is not None:
            wire[key] = getattr(scope, key)
    if scope.exclude:
        wire["exclude"] = sorted(scope.exclude)
    return wire


def terms_to_wire(terms: Terms) -> dict[str, Any]:
    """``max_rate_bp``, ``bonuses`` and ``datacenters`` as ``program_published``
    carries them."""
    return {
        "max_rate_bp": terms.max_rate_bp,
        "bonuses": [
            {"when": dict(bonus.when), "add_bp": bonus.add_bp}
            for bonus in terms.bonuses
        ],
        "datacenters": scope_to_wire(terms.datacenters),
    }


def _id_set(value: Any) -> frozenset[str]:
    # Only strings can equal a data-centre id; anything else matches nothing.
    if not isinstance(value, list | tuple):
        return frozenset()
    return frozenset(item for item in value if isinstance(item, str))


def scope_from_wire(value: Any) -> DatacenterScope:
    """``any`` | [ids] | {ids, hub_region, government_run, chip_origin, exclude}.

    The reader is lenient, as the wire is another city's: an absent scope is
    ``any``, unknown keys are ignored, a shape it cannot read admits nothing.
    """
    if value is None or value == ANY:
        return ANYWHERE
    if isinstance(value, list):
        return DatacenterScope(ids=_id_set(value))
    if isinstance(value, Mapping):
        ids = value.get("ids")
        return DatacenterScope(
            ids=_id_set(ids) if ids is not None else None,
            hub_region=value.get("hub_region"),
            government_run=value.get("government_run"),
            chip_origin=value.get("chip_origin"),
            exclude=_id_set(value.get("exclude") or []),
        )
    return NOWHERE


def bonuses_from_wire(bonuses: Iterable[Any] | None) -> tuple[Bonus, ...]:
    """``[{when: {...}, add_bp}]``; the conditions keep the order they came in."""
    parsed = []
    for bonus in bonuses or ():
        when = bonus.get("when") or {}
        parsed.append(Bonus(tuple(when.items()), int(bonus.get("add_bp") or 0)))
    return tuple(parsed)


def terms_from_wire(program: Mapping[str, Any]) -> ProgramTerms:
    """A ``program_published`` program's ``rate_bp`` and terms, as ``ProgramTerms``;
    terms the city does not publish are: no cap, no bonus, anywhere."""
    return ProgramTerms(
        rate_bp=program["rate_bp"],
        max_rate_bp=program.get("max_rate_bp"),
        bonuses=bonuses_from_wire(program.get("bonuses")),
        datacenters=scope_from_wire(program.get("datacenters")),
    )
