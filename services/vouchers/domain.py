"""A city's voucher rules, pure Python: eligibility, subsidy and ledger arithmetic.

No nameko, no SQLAlchemy, no I/O. ``rules.py`` turns a rules file into the
types defined here; the ``ledger`` package applies the decisions taken here to
the database. Money is integer fen, rates integer basis points (``units.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Union

from services.common.terms import (  # noqa: F401 - the vouchers' names for them
    ANYWHERE,
    DATACENTER_ATTRIBUTES,
    UTILISATION_BELOW,
    Bonus,
    DatacenterScope,
    effective_rate_bp,
    subsidy_fen,
    terms_to_wire,
)
from services.vouchers.consent import (  # noqa: F401 - the vouchers' names for them
    AUTHORISED,
    BINDING_STATUSES,
    CANCEL,
    DEFAULT_GRACE_DAYS,
    MAX_GRACE_DAYS,
    REQUEST,
    REQUESTED,
    WITHDRAWN,
    binding_after,
    expired,
    grace_ends,
    in_time,
)

KINDS = ("compute", "training_data")
REVIEWS = ("auto", "manual")

APPROVED = "approved"
REJECTED = "rejected"
PENDING_REVIEW = "pending_review"

ACTIVE = "active"
EXPIRED = "expired"
REVOKED = "revoked"
VOUCHER_STATUSES = (ACTIVE, EXPIRED, REVOKED)
APPLICATION_STATUSES = (APPROVED, REJECTED, PENDING_REVIEW)

# Why a rated usage record was not booked (CONTRACTS.md §1 reasons).
UNKNOWN_VOUCHER = "unknown_voucher"
VOUCHER_EXPIRED = "voucher_expired"
VOUCHER_REVOKED = "voucher_revoked"
VOUCHER_WRONG_DATACENTER = "voucher_wrong_datacenter"
# A correction of this record arrived (and was booked) before the record.
SUPERSEDED = "superseded"
# DESIGN.md §9, consent and time: the voucher's holder has not authorised the
# record's tenant at its data centre; the record started before the voucher
# was issued, or before the tenant was authorised.
TENANT_NOT_AUTHORISED = "tenant_not_authorised"
BEFORE_AUTHORISATION = "before_authorisation"

# Review (issue 15): a held record is held, then released or refused, once.
HELD = "held"
RELEASED = "released"
REFUSED = "refused"
HELD_STATUSES = (HELD, RELEASED, REFUSED)
RELEASE = "release"
REFUSE = "refuse"
REVIEW_DECISIONS = (RELEASE, REFUSE)
# A release that would book nothing: the voucher's balance is spent.
VOUCHER_EXHAUSTED = "voucher_exhausted"


# --------------------------------------------------------------------------
# Eligibility: a tree of all_of / any_of / not over named predicates.


@dataclass(frozen=True)
class Reason:
    """One rule's verdict, as stored with the decision and shown to the company."""

    rule: str
    passed: bool
    evidence: str

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "passed": self.passed, "evidence": self.evidence}


@dataclass(frozen=True)
class PredicateSpec:
    """A named test of an applicant: what its argument must be, and the test.

    ``check(company, argument)`` returns ``(passed, evidence)``.
    """

    name: str
    argument: str  # for error messages: "a string", "a whole number ≥ 0" …
    accepts: Callable[[Any], bool]
    check: Callable[[Mapping[str, Any], Any], tuple[bool, str]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _registered_in(company: Mapping[str, Any], city: str) -> tuple[bool, str]:
    actual = company.get("registered_in")
    if actual is None:
        return False, "registered_in not given"
    return str(actual).lower() == city.lower(), f"registered_in={actual}"


def _bound(
    fact: str, *, at_most: bool
) -> Callable[[Mapping[str, Any], int], tuple[bool, str]]:
    """The check that the company's ``fact`` is at most (or at least) a bound."""

    def check(company: Mapping[str, Any], bound: int) -> tuple[bool, str]:
        value = company.get(fact)
        if value is None:
            return False, f"{fact} not given"
        passed = value <= bound if at_most else value >= bound
        word = "at most" if at_most else "at least"
        return passed, f"{fact}={value} ({word} {bound})"

    return check


def _bound_spec(name: str, fact: str, *, at_most: bool) -> PredicateSpec:
    """A predicate bounding a whole-number fact (of CNY when it is money)."""
    unit = " of CNY" if fact.endswith("_cny") else ""
    return PredicateSpec(
        name,
        f"a whole number{unit} ≥ 0",
        lambda v: _is_int(v) and v >= 0,
        _bound(fact, at_most=at_most),
    )


def _research_project(company: Mapping[str, Any], wanted: bool) -> tuple[bool, str]:
    actual = company.get("government_research_project")
    if actual is None:
        actual = False
        evidence = "government_research_project not declared"
    else:
        evidence = f"government_research_project={str(actual).lower()}"
    return bool(actual) == wanted, evidence


def _sector_in(company: Mapping[str, Any], sectors: list[str]) -> tuple[bool, str]:
    sector = company.get("sector")
    if sector is None:
        return False, "sector not given"
    wanted = {s.lower() for s in sectors}
    return str(sector).lower() in wanted, f"sector={sector}"


def as_date(value: Any) -> date | None:
    """A ``date`` from a date, a datetime or an ISO string; None if unreadable."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            return None
    return None


def _founded(after: bool) -> Callable[[Mapping[str, Any], Any], tuple[bool, str]]:
    def check(company: Mapping[str, Any], limit: Any) -> tuple[bool, str]:
        founded = as_date(company.get("founded_on"))
        if founded is None:
            return False, "founded_on not given"
        bound = as_date(limit)
        passed = founded > bound if after else founded < bound
        word = "after" if after else "before"
        return passed, f"founded_on={founded.isoformat()} ({word} {bound})"

    return check


def _is_date(value: Any) -> bool:
    return as_date(value) is not None and not isinstance(value, bool)


def _is_name_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, str) and v for v in value)
    )


PREDICATES: dict[str, PredicateSpec] = {
    spec.name: spec
    for spec in (
        PredicateSpec(
            "registered_in",
            "a city code",
            lambda v: isinstance(v, str) and bool(v),
            _registered_in,
        ),
        _bound_spec("max_employees", "employees", at_most=True),
        _bound_spec("min_annual_revenue_cny", "annual_revenue_cny", at_most=False),
        PredicateSpec(
            "government_research_project",
            "true or false",
            lambda v: isinstance(v, bool),
            _research_project,
        ),
        _bound_spec("min_employees", "employees", at_most=False),
        _bound_spec("max_annual_revenue_cny", "annual_revenue_cny", at_most=True),
        PredicateSpec(
            "sector_in",
            "a non-empty list of sector names",
            _is_name_list,
            _sector_in,
        ),
        PredicateSpec(
            "founded_after",
            "a date (YYYY-MM-DD)",
            _is_date,
            _founded(after=True),
        ),
        PredicateSpec(
            "founded_before",
            "a date (YYYY-MM-DD)",
            _is_date,
            _founded(after=False),
        ),
    )
}
COMBINATORS = ("all_of", "any_of", "not")


@dataclass(frozen=True)
class Predicate:
    name: str
    argument: Any

    def describe(self) -> str:
        arg = self.argument
        if isinstance(arg, bool):
            arg = str(arg).lower()
        elif isinstance(arg, list):
            arg = "[" + ", ".join(str(a) for a in arg) + "]"
        elif isinstance(arg, date):
            arg = arg.isoformat()
        return f"{self.name}: {arg}"


@dataclass(frozen=True)
class AllOf:
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class AnyOf:
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Not:
    rule: Rule


Rule = Union[Predicate, AllOf, AnyOf, Not]  # noqa: UP007 - a forward-referenced alias

ALWAYS = AllOf(())


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[Reason, ...]


def evaluate(rule: Rule, company: Mapping[str, Any]) -> Verdict:
    """Decide ``rule`` for ``company``; every node gives a reason, depth first.

    All branches are evaluated (no short circuit), so the applicant sees every
    rule they failed, not just the first.
    """
    if isinstance(rule, Predicate):
        passed, evidence = PREDICATES[rule.name].check(company, rule.argument)
        return Verdict(passed, (Reason(rule.describe(), passed, evidence),))
    if isinstance(rule, Not):
        inner = evaluate(rule.rule, company)
        passed = not inner.passed
        own = Reason(
            "not", passed, f"inner rule {'passed' if inner.passed else 'failed'}"
        )
        return Verdict(passed, (own, *inner.reasons))
    verdicts = [evaluate(child, company) for child in rule.rules]
    hits = sum(v.passed for v in verdicts)
    if isinstance(rule, AllOf):
        name, passed = "all_of", hits == len(verdicts)
    else:
        name, passed = "any_of", hits > 0
    own = Reason(name, passed, f"{hits} of {len(verdicts)} passed")
    return Verdict(passed, (own, *(r for v in verdicts for r in v.reasons)))


# --------------------------------------------------------------------------
# Programs: rates, bonuses, where a voucher may be spent. The terms are written
# once, in services/common/terms.py, for the registry's recommendations too.


@dataclass(frozen=True)
class Program:
    id: str
    kind: str
    budget_fen: int
    rate_bp: int
    max_rate_bp: int
    face_min_fen: int
    face_max_fen: int
    valid_days: int
    review: str = "auto"
    eligibility: Rule = ALWAYS
    bonuses: tuple[Bonus, ...] = ()
    datacenters: DatacenterScope = ANYWHERE
    grace_days: int = DEFAULT_GRACE_DAYS


def program_summary(
    program: Program,
    rules_version: str,
    rules_sha256: str,
    budget_fen: int,
    available_fen: int,
    committed_fen: int,
    redeemed_fen: int,
) -> dict[str, Any]:
    """One program as ``program_published`` carries it (CONTRACTS.md §3).

    Beyond the contract's fields it carries the terms that price a voucher's
    use at a given data centre (cap, bonuses, scope), so that the registry's
    recommendations apply the city's own rules, and the ledger state.
    """
    return {
        "id": program.id,
        "kind": program.kind,
        "budget_fen": budget_fen,
        "rate_bp": program.rate_bp,
        "rules_version": rules_version,
        "rules_sha256": rules_sha256,
        "available_fen": available_fen,
        "committed_fen": committed_fen,
        "redeemed_fen": redeemed_fen,
        **terms_to_wire(program),
    }


@dataclass(frozen=True)
class CityRules:
    city: str
    name: str
    region: str
    # The prefix of the city's voucher codes: the registry's reservation
    # (rules.instance_rules); None only for a file checked on its own.
    voucher_prefix: str | None
    programs: tuple[Program, ...]
    version: str
    sha256: str
    source: str = ""

    def program(self, program_id: str) -> Program | None:
        return next((p for p in self.programs if p.id == program_id), None)


@dataclass(frozen=True)
class Decision:
    decision: str  # approved | rejected | pending_review
    reasons: tuple[Reason, ...] = field(default_factory=tuple)


def decide(program: Program, company: Mapping[str, Any]) -> Decision:
    """Eligibility, then review: approved only when every rule passes."""
    verdict = evaluate(program.eligibility, company)
    if not verdict.passed:
        return Decision(REJECTED, verdict.reasons)
    if program.review == "manual":
        return Decision(PENDING_REVIEW, verdict.reasons)
    return Decision(APPROVED, verdict.reasons)


def face_value_problem(program: Program, face_value_fen: int) -> str | None:
    """Why a requested face value is not allowed, or None."""
    if not program.face_min_fen <= face_value_fen <= program.face_max_fen:
        return (
            f"must be between {program.face_min_fen // 100} and "
            f"{program.face_max_fen // 100} CNY for program {program.id}"
        )
    return None


def usage_problem(
    program: Program | None,
    voucher_status: str | None,
    expires_at: Any,
    started_at: Any,
    datacenter_id: str,
    datacenter: Mapping[str, Any],
    *,
    ended_at: datetime,
    issued_at: datetime | None,
    authorised_at: datetime | None,
    now: datetime,
) -> str | None:
    """Why a rated record cannot be booked against this voucher, or None.

    ``authorised_at`` is when the holder authorised the record's tenant at its
    data centre, None when that binding is not authorised (DESIGN.md §9).
    The checks go from the voucher to the record: a record that could never
    be booked on it says so before one its holder could still authorise.
    """
    if voucher_status is None:
        return UNKNOWN_VOUCHER
    if voucher_status == REVOKED:
        return VOUCHER_REVOKED
    grace_days = program.grace_days if program is not None else DEFAULT_GRACE_DAYS
    if voucher_status != ACTIVE or not in_time(
        expires_at, grace_days, started_at, ended_at, now
    ):
        return VOUCHER_EXPIRED
    scope = program.datacenters if program is not None else ANYWHERE
    if not scope.admits(datacenter_id, datacenter):
        return VOUCHER_WRONG_DATACENTER
    if issued_at is not None and started_at < issued_at:
        return BEFORE_AUTHORISATION
    if authorised_at is None:
        return TENANT_NOT_AUTHORISED
    if started_at < authorised_at:
        return BEFORE_AUTHORISATION
    return None


def release_problem(
    voucher_status: str | None, wanted_fen: int, payable_fen: int
) -> str | None:
    """Why a held record's release cannot book the ``wanted_fen`` it was held
    with, of which the voucher can pay ``payable_fen`` now; or None.

    Within the grace period a voucher is still active (CONTRACTS.md, Time):
    its status says whether it may still pay; a spent balance pays nothing.
    """
    if voucher_status is None:
        return UNKNOWN_VOUCHER
    if voucher_status == REVOKED:
        return VOUCHER_REVOKED
    if voucher_status != ACTIVE:
        return VOUCHER_EXPIRED
    if wanted_fen > 0 and payable_fen <= 0:
        return VOUCHER_EXHAUSTED
    return None


def standing(kinds: Iterable[str], booking: Iterable[str]) -> int | None:
    """Of a record's redemption rows (their kinds, in booking order), the
    index of the one whose subsidy stands booked now, or None.

    Rows of a ``booking`` kind book (usage, a release); every other kind (a
    correction's reversal, a hold's, a clawback) takes the booking back, so
    the last row decides.
    """
    kinds = list(kinds)
    if kinds and kinds[-1] in set(booking):
        return len(kinds) - 1
    return None


# --------------------------------------------------------------------------
# The rules the database holds the ledger to as well: the ledger decides with
# these, and its unique index, CHECK constraints and row locks keep the
# decisions true when two transactions race.

ACTIVE_VOUCHER_EXISTS = "active_voucher_exists"
BUDGET_EXHAUSTED = "budget_exhausted"


def active_voucher(held: Iterable[tuple[str, str]]) -> str | None:
    """Of one company's vouchers of one program, as (code, status), the active
    one, which forbids issuing another; None when one may be issued.

    The partial unique index ``uq_vouchers_active_company_program`` states the
    same rule to two applications racing.
    """
    return next((code for code, status in held if status == ACTIVE), None)


def expiry_date(issued_at: datetime, valid_days: int) -> datetime:
    """When a voucher of a program valid ``valid_days`` issued then expires."""
    return issued_at + timedelta(days=valid_days)


def due_to_expire(
    status: str, expires_at: datetime, grace_days: int, now: datetime
) -> bool:
    """Whether the expiry timer closes this voucher ``now``: once its grace
    period is over, so that late usage of time it covered is still booked."""
    return status == ACTIVE and expired(grace_ends(expires_at, grace_days), now)


def covers(funds_fen: int, amount_fen: int) -> bool:
    """Whether ``funds_fen`` cover ``amount_fen``: a program's available funds a
    face value issued from them; a voucher's balance, and its program's
    committed funds, a subsidy (``subsidy_fen`` caps it at both).

    The CHECK constraints on ``programs`` and ``vouchers`` (no balance below
    zero) state the same rule to the database.
    """
    return amount_fen <= funds_fen


# --------------------------------------------------------------------------
# Ledger accounts: every balance kept on a row is the sum of one account.


def program_account(program_id: str, column: str) -> str:
    """``available``, ``committed``, ``redeemed`` or ``released`` of a program."""
    return f"program:{program_id}:{column}"


def voucher_account(code: str, column: str) -> str:
    """``face``, ``redeemed`` or ``released`` of a voucher."""
    return f"voucher:{code}:{column}"


def issue_entries(program_id: str, code: str, face_fen: int) -> list[tuple[str, int]]:
    """Face value moves from the program's available funds to committed."""
    return [
        (program_account(program_id, "available"), -face_fen),
        (program_account(program_id, "committed"), face_fen),
        (voucher_account(code, "face"), face_fen),
    ]


def redemption_entries(
    program_id: str, code: str, subsidy: int
) -> list[tuple[str, int]]:
    """A subsidy (negative for a reversal) moves committed funds to redeemed."""
    return [
        (program_account(program_id, "committed"), -subsidy),
        (program_account(program_id, "redeemed"), subsidy),
        (voucher_account(code, "redeemed"), subsidy),
    ]


def release_entries(
    program_id: str, code: str, amount: int, *, from_redeemed: bool = False
) -> list[tuple[str, int]]:
    """An unspent balance (or a reversed subsidy of a closed voucher) goes back.

    Normally the committed funds return to available; ``from_redeemed`` is the
    reversal of a subsidy on a voucher that is already expired or revoked: the
    money leaves ``redeemed`` and, as the voucher holds no commitment any more,
    is released straight to available.
    """
    source = "redeemed" if from_redeemed else "committed"
    entries = [
        (program_account(program_id, source), -amount),
        (program_account(program_id, "available"), amount),
        (program_account(program_id, "released"), amount),
        (voucher_account(code, "released"), amount),
    ]
    if from_redeemed:
        entries.append((voucher_account(code, "redeemed"), -amount))
    return entries


def review_decision(decision: Decision, approve: bool, reason: str) -> Decision:
    """A reviewer's verdict on a pending application, kept with its reasons."""
    if decision.decision != PENDING_REVIEW:
        raise ValueError(f"application is {decision.decision}, not pending_review")
    verdict = APPROVED if approve else REJECTED
    own = Reason("manual_review", approve, reason)
    return Decision(verdict, (*decision.reasons, own))
