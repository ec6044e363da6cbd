"""Reading the books: vouchers, listings in pages, statements, totals, and the
reconciliation of the row balances with the ledger's sums."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from sqlalchemy import BigInteger, String, case, func, literal, null, select, union_all
from sqlalchemy.orm import Session

from services.common.errors import InvalidRequest, NotFound
from services.common.sqltypes import UtcDateTime
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger.redemptions import (
    CLAWBACK,
    HOLD_REVERSAL,
    REVERSAL,
    USAGE,
)
from services.vouchers.models import (
    Application,
    HeldUsage,
    LedgerEntry,
    Program,
    Redemption,
    RejectedUsage,
    Voucher,
)

# A redemption line's status (CONTRACTS.md §7) from what the ledger keeps: a
# usage row (or its booking again on release) was booked; a reversal row
# gives back the subsidy of a booked line that a correction superseded, a
# clawback one that a review found wrong; a hold row takes back a booking
# while it is reviewed; a rejected_usage row naming the voucher was refused
# (nothing booked, so no GPU-seconds or money on it); a held_usage row still
# held on arrival is held (rated, not booked: no money on it).
BOOKED = "booked"
CLAWED_BACK = "clawed_back"
REFUSED = "refused"
HELD = "held"


# A refused or held line's job columns: the ledger keeps no job for them.
_NO_JOB = (
    null().cast(String),
    null().cast(UtcDateTime()),
    null().cast(UtcDateTime()),
)


def get_voucher(
    session: Session, code: str, limit: int = 100
) -> tuple[Voucher, list, int]:
    """The voucher, its latest ``limit`` redemption lines, and how many there are."""
    voucher = _found(session, Voucher, code)
    lines = list(
        session.scalars(
            select(Redemption)
            .where(Redemption.voucher_code == code)
            .order_by(Redemption.id.desc())
            .limit(limit)
        )
    )
    total = session.scalar(select(func.count()).where(Redemption.voucher_code == code))
    session.rollback()
    return voucher, lines[::-1], total


def list_redemptions(
    session: Session, code: str, limit: int, offset: int
) -> tuple[Voucher, list[dict[str, Any]], int]:
    """The voucher and one page of every line the city's ledger has for it:
    booked and reversed redemptions and refused records, oldest first.

    Ordered by when each was written, then booked before refused, then row id:
    a total order, so consecutive pages neither repeat nor skip a line.
    """
    limit, offset = _page(limit, offset)
    voucher = _found(session, Voucher, code)
    booked = select(
        literal(0).label("source"),
        Redemption.id.label("id"),
        Redemption.booked_at.label("at"),
        Redemption.record_id,
        Redemption.datacenter_id,
        Redemption.kind,
        case(
            (Redemption.kind.in_((REVERSAL, CLAWBACK)), literal(CLAWED_BACK)),
            (Redemption.kind == HOLD_REVERSAL, literal(HELD)),
            else_=literal(BOOKED),
        ).label("status"),
        Redemption.gpu_seconds,
        Redemption.cost_fen,
        Redemption.rate_bp,
        Redemption.subsidy_fen,
        null().cast(String).label("reason"),
        # the job (migration 0008; null on older rows)
        Redemption.tenant_id,
        Redemption.started_at,
        Redemption.ended_at,
    ).where(Redemption.voucher_code == code)
    refused = select(
        literal(1),
        RejectedUsage.id,
        RejectedUsage.received_at,
        RejectedUsage.record_id,
        RejectedUsage.datacenter_id,
        literal(USAGE),
        literal(REFUSED),
        null().cast(BigInteger),
        null().cast(BigInteger),
        null().cast(BigInteger),
        null().cast(BigInteger),
        RejectedUsage.reason,
        *_NO_JOB,
    ).where(RejectedUsage.voucher_code == code)
    held = select(
        literal(2),
        HeldUsage.id,
        HeldUsage.held_at,
        HeldUsage.record_id,
        HeldUsage.datacenter_id,
        literal(USAGE),
        literal(HELD),
        HeldUsage.gpu_seconds,
        HeldUsage.cost_fen,
        null().cast(BigInteger),
        null().cast(BigInteger),
        HeldUsage.reason,
        *_NO_JOB,
    ).where(
        HeldUsage.voucher_code == code,
        HeldUsage.status == domain.HELD,
        HeldUsage.record.is_not(None),
    )
    lines = union_all(booked, refused, held).subquery()
    rows = session.execute(
        select(lines)
        .order_by(lines.c.at, lines.c.source, lines.c.id)
        .limit(limit)
        .offset(offset)
    ).all()
    total = session.scalar(select(func.count()).select_from(lines))
    session.rollback()
    items = [
        {
            "record_id": row.record_id,
            "datacenter_id": row.datacenter_id,
            "kind": row.kind,
            "status": row.status,
            "gpu_seconds": row.gpu_seconds,
            "cost_fen": row.cost_fen,
            "rate_bp": row.rate_bp,
            "subsidy_fen": row.subsidy_fen,
            "booked_at": row.at,
            "reason": row.reason,
            "tenant_id": row.tenant_id,
            "started_at": row.started_at,
            "ended_at": row.ended_at,
        }
        for row in rows
    ]
    return voucher, items, total


def not_found(model: type, key: str) -> NotFound:
    """``<model>_not_found``: no ``model`` row has the key ``key``."""
    name = model.__name__.lower()
    return NotFound(f"{name}_not_found", f"no {name} {key}")


def _found(session: Session, model: type, key: str) -> Any:
    """The ``model`` row of ``key``; ``NotFound`` (the read ended) without one."""
    row = session.get(model, key)
    if row is None:
        session.rollback()
        raise not_found(model, key)
    return row


def _page(limit: int, offset: int) -> tuple[int, int]:
    if not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidRequest("invalid_page", "limit must be between 1 and 1000")
    if not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("invalid_page", "offset must be ≥ 0")
    return limit, offset


def list_applications(
    session: Session, status: str | None, limit: int, offset: int
) -> tuple[list[Application], int]:
    limit, offset = _page(limit, offset)
    _check_status(status, domain.APPLICATION_STATUSES)
    where = [] if status is None else [Application.decision == status]
    order = (Application.decided_at, Application.id)
    return _listed(session, Application, where, order, limit, offset)


def get_application(session: Session, application_id: str) -> Application:
    row = _found(session, Application, application_id)
    session.rollback()
    return row


def list_vouchers(
    session: Session,
    company_id: str | None,
    status: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Voucher], int]:
    limit, offset = _page(limit, offset)
    _check_status(status, domain.VOUCHER_STATUSES)
    where = []
    if company_id is not None:
        where.append(Voucher.company_id == company_id)
    if status is not None:
        where.append(Voucher.status == status)
    order = (Voucher.issued_at, Voucher.code)
    return _listed(session, Voucher, where, order, limit, offset)


def _check_status(status: str | None, allowed) -> None:
    if status is not None and status not in allowed:
        raise InvalidRequest(
            "invalid_status", f"status must be one of {', '.join(allowed)}"
        )


def _listed(session: Session, model, where: list, order, limit: int, offset: int):
    """One page of ``model`` rows matching ``where`` and the count of them all."""
    rows = list(
        session.scalars(
            select(model).where(*where).order_by(*order).limit(limit).offset(offset)
        )
    )
    total = session.scalar(select(func.count()).select_from(model).where(*where))
    session.rollback()
    return rows, total


def _entries(session: Session, accounts: list[str], limit: int, offset: int):
    rows = session.scalars(
        select(LedgerEntry)
        .where(LedgerEntry.account.in_(accounts))
        .order_by(LedgerEntry.id)
        .limit(limit)
        .offset(offset)
    ).all()
    total = session.scalar(
        select(func.count())
        .select_from(LedgerEntry)
        .where(LedgerEntry.account.in_(accounts))
    )
    return [
        {
            "id": r.id,
            "account": r.account,
            "amount_fen": r.amount_fen,
            "reference": r.reference,
            "created_at": r.created_at,
        }
        for r in rows
    ], total


def voucher_statement(
    session: Session, code: str, limit: int = 1000, offset: int = 0
) -> tuple[Voucher, list[dict], int]:
    columns = ("face", "redeemed", "released")
    return _statement(
        session, Voucher, code, domain.voucher_account, columns, limit, offset
    )


PROGRAM_COLUMNS = ("available", "committed", "redeemed", "released")


def program_statement(
    session: Session, program_id: str, limit: int = 1000, offset: int = 0
) -> tuple[Program, list[dict], int]:
    return _statement(
        session,
        Program,
        program_id,
        domain.program_account,
        PROGRAM_COLUMNS,
        limit,
        offset,
    )


def _statement(
    session: Session,
    model: type,
    key: str,
    account: Callable[[str, str], str],
    columns: Sequence[str],
    limit: int,
    offset: int,
) -> tuple[Any, list[dict], int]:
    """The ``model`` row of ``key`` and one page of its accounts' entries."""
    limit, offset = _page(limit, offset)
    row = _found(session, model, key)
    accounts = [account(key, c) for c in columns]
    entries, total = _entries(session, accounts, limit, offset)
    session.rollback()
    return row, entries, total


def ledger_totals(session: Session, rules: domain.CityRules) -> dict[str, Any]:
    """Each program's money summed from its ledger accounts (not the row caches)."""
    as_of = utcnow()
    sums = dict(
        session.execute(
            select(LedgerEntry.account, func.sum(LedgerEntry.amount_fen))
            .where(LedgerEntry.account.like("program:%"))
            .group_by(LedgerEntry.account)
        ).all()
    )
    issued = dict(
        session.execute(
            select(Voucher.program_id, func.count()).group_by(Voucher.program_id)
        ).all()
    )
    budgets = dict(session.execute(select(Program.id, Program.budget_fen)).all())
    session.rollback()
    programs = []
    for program in rules.programs:
        if program.id not in budgets:
            continue
        totals = {
            f"{c}_fen": int(sums.get(domain.program_account(program.id, c)) or 0)
            for c in PROGRAM_COLUMNS
        }
        programs.append(
            {
                "program_id": program.id,
                "budget_fen": budgets[program.id],
                **totals,
                "vouchers_issued": issued.get(program.id, 0),
            }
        )
    return {"city": rules.city, "as_of": as_of, "programs": programs}


def check_ledger(session: Session) -> list[str]:
    """Every problem with the books, in words; an empty list means they balance.

    Balances on the rows must equal the sums of their ledger accounts, a
    program's available + committed + redeemed must equal its budget, and no
    balance may be negative.
    """
    sums = dict(
        session.execute(
            select(LedgerEntry.account, func.sum(LedgerEntry.amount_fen)).group_by(
                LedgerEntry.account
            )
        ).all()
    )
    problems = []
    for row in session.scalars(select(Program).order_by(Program.id)):
        problems += _drift(
            f"program {row.id}",
            {c: getattr(row, f"{c}_fen") for c in PROGRAM_COLUMNS},
            partial(domain.program_account, row.id),
            sums,
            negative=True,
        )
        total = row.available_fen + row.committed_fen + row.redeemed_fen
        if total != row.budget_fen:
            problems.append(
                f"program {row.id}: available+committed+redeemed {total} "
                f"!= budget {row.budget_fen}"
            )
    for voucher in session.scalars(select(Voucher).order_by(Voucher.code)):
        problems += _drift(
            f"voucher {voucher.code}",
            {
                "face": voucher.face_value_fen,
                "redeemed": voucher.redeemed_fen,
                "released": voucher.released_fen,
            },
            partial(domain.voucher_account, voucher.code),
            sums,
        )
        if voucher.balance_fen < 0:
            problems.append(
                f"voucher {voucher.code}: balance {voucher.balance_fen} is negative"
            )
    session.rollback()
    return problems


def _drift(
    name: str,
    balances: dict[str, int],
    account: Callable[[str], str],
    sums: dict[str, int],
    *,
    negative: bool = False,
) -> Iterator[str]:
    """Where ``name``'s balances differ from the sums of their ledger accounts
    (and, with ``negative``, where they are below zero)."""
    for column, value in balances.items():
        ledger = int(sums.get(account(column)) or 0)
        if ledger != value:
            yield f"{name}: {column} {value} but ledger says {ledger}"
        if negative and value < 0:
            yield f"{name}: {column} {value} is negative"
