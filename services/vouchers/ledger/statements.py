"""A voucher's monthly statement (issue 17): what a finance department files.

For one UTC calendar month: the balance at its start (the opening), each job
the voucher subsidised in it, the subsidies given back in it (clawbacks, the
reversal of a corrected record, a booking held for review after all: each a
negative line), what was released to the program's budget in it (expiry,
revocation), the face value if the voucher was issued in it, and the balance
at its end (the closing). Read in one transaction; the balances are sums of
the ledger's own postings on the voucher's accounts, not the row caches, and
the lines are the ``redemptions`` rows of the month, so that

    opening + issued − subsidies + clawbacks − released = closing

is a check of the lines against the postings, to the fen (``reconciled``).

:func:`compose` is pure (unit-tested without a
database); :func:`monthly_statement` reads the books.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from services.common.errors import NotFound
from services.common.units import format_gpu_hours, month_bounds, month_of, utcnow
from services.vouchers import domain
from services.vouchers.ledger.queries import not_found
from services.vouchers.ledger.redemptions import BOOKING_KINDS
from services.vouchers.ledger.sql import dialect
from services.vouchers.models import Application, LedgerEntry, Redemption, Voucher

log = logging.getLogger(__name__)

# The voucher's accounts (domain.voucher_account): balance = face − the others.
ACCOUNTS = ("face", "redeemed", "released")
# What a release's ledger reference starts with (lifecycle._close, and
# booking._reverse on a closed voucher: "<kind>-release:<dc>:<record>").
RELEASE_REASONS = {"expired": "expired", "revoked": "revoked"}


def check_in_range(month: str, issued_at: datetime, now: datetime) -> None:
    """``NotFound month_out_of_range`` for a month before the voucher's issue
    or after the current one: there is no statement of it (yet)."""
    first, last = month_of(issued_at), month_of(now)
    if not first <= month <= last:
        raise NotFound(
            "month_out_of_range",
            f"statements of this voucher run from {first} to {last}",
            {"month": month, "first": first, "last": last},
        )


def _line(row: Mapping[str, Any]) -> dict[str, Any]:
    line = dict(row)
    line["gpu_hours"] = format_gpu_hours(row["gpu_seconds"])
    line["company_pays_fen"] = row["cost_fen"] - row["subsidy_fen"]
    return line


def _release(entry: Mapping[str, Any]) -> dict[str, Any]:
    head, _, rest = entry["reference"].partition(":")
    kind = head.removesuffix("-release")
    dc, _, record_id = rest.partition(":") if head != kind else ("", "", "")
    return {
        "reason": RELEASE_REASONS.get(kind, f"{kind}_after_close"),
        "released_fen": entry["amount_fen"],
        "released_at": entry["created_at"],
        "datacenter_id": dc or None,
        "record_id": record_id or None,
        "reference": entry["reference"],
    }


def compose(
    before: Mapping[str, int],
    during: Mapping[str, int],
    rows: Iterable[Mapping[str, Any]],
    releases: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """The statement's figures from what the ledger holds.

    ``before``/``during``: the sums of the voucher's postings (by account:
    face, redeemed, released) before the month and within it; ``rows``: its
    redemption rows of the month in booking order; ``releases``: its postings
    on the released account within the month.
    """
    opening = before.get("face", 0) - before.get("redeemed", 0)
    opening -= before.get("released", 0)
    issued = during.get("face", 0)
    jobs, clawbacks = [], []
    for row in rows:
        (jobs if row["kind"] in BOOKING_KINDS else clawbacks).append(_line(row))
    released = [_release(entry) for entry in releases]
    totals = {
        "jobs": len(jobs),
        "gpu_seconds": sum(line["gpu_seconds"] for line in jobs),
        "cost_fen": sum(line["cost_fen"] for line in jobs),
        "subsidies_fen": sum(line["subsidy_fen"] for line in jobs),
        "company_pays_fen": sum(line["company_pays_fen"] for line in jobs),
        # given back to the voucher: a positive amount of negative lines
        "clawbacks_fen": -sum(line["subsidy_fen"] for line in clawbacks),
        "released_fen": sum(line["released_fen"] for line in released),
        "issued_fen": issued,
    }
    totals["gpu_hours"] = format_gpu_hours(totals["gpu_seconds"])
    closing = opening + issued - during.get("redeemed", 0)
    closing -= during.get("released", 0)
    lines_closing = (
        opening
        + issued
        - totals["subsidies_fen"]
        + totals["clawbacks_fen"]
        - totals["released_fen"]
    )
    return {
        "opening_balance_fen": opening,
        "closing_balance_fen": closing,
        "jobs": jobs,
        "clawbacks": clawbacks,
        "releases": released,
        "totals": totals,
        # the lines add up to the postings: a false here is a ledger fault
        "reconciled": lines_closing == closing,
    }


def _sums(session: Session, code: str, start: datetime, end: datetime):
    """The voucher's postings summed by account, before ``start`` and in
    [``start``, ``end``)."""
    accounts = {domain.voucher_account(code, name): name for name in ACCOUNTS}
    at = LedgerEntry.created_at
    rows = session.execute(
        select(
            LedgerEntry.account,
            func.sum(case((at < start, LedgerEntry.amount_fen), else_=0)),
            func.sum(
                case(((at >= start) & (at < end), LedgerEntry.amount_fen), else_=0)
            ),
        )
        .where(LedgerEntry.account.in_(accounts), at < end)
        .group_by(LedgerEntry.account)
    ).all()
    before = {accounts[a]: int(b or 0) for a, b, _ in rows}
    during = {accounts[a]: int(d or 0) for a, _, d in rows}
    return before, during


_ROW_COLUMNS = (
    Redemption.record_id,
    Redemption.datacenter_id,
    Redemption.kind,
    Redemption.tenant_id,
    Redemption.gpu_model,
    Redemption.gpu_count,
    Redemption.started_at,
    Redemption.ended_at,
    Redemption.gpu_seconds,
    Redemption.cost_fen,
    Redemption.rate_bp,
    Redemption.subsidy_fen,
    Redemption.booked_at,
)


def _read_snapshot(session: Session) -> None:
    """Start a read transaction that sees one snapshot: on PostgreSQL
    REPEATABLE READ (READ COMMITTED would let a booking committed between two
    of the queries below make the lines disagree with the balances); SQLite
    reads a snapshot in any transaction."""
    session.rollback()
    if dialect(session) == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def monthly_statement(
    session: Session,
    rules: domain.CityRules,
    code: str,
    month: str,
    now: datetime | None = None,
    company_id: str | None = None,
) -> dict[str, Any]:
    """The statement of voucher ``code`` for ``month`` (``YYYY-MM``, UTC).

    With ``company_id`` (the portal's caller is a company) a voucher of
    another holder is ``voucher_not_found``, before the month is checked
    against its dates: another company learns nothing, not even when it was
    issued."""
    start, end = month_bounds(month)
    _read_snapshot(session)
    try:
        voucher = session.get(Voucher, code)
        if voucher is None or company_id not in (None, voucher.company_id):
            raise not_found(Voucher, code)
        check_in_range(month, voucher.issued_at, now or utcnow())
        application = session.get(Application, voucher.application_id)
        before, during = _sums(session, code, start, end)
        rows = session.execute(
            select(*_ROW_COLUMNS)
            .where(
                Redemption.voucher_code == code,
                Redemption.booked_at >= start,
                Redemption.booked_at < end,
            )
            .order_by(Redemption.id)
        ).all()
        releases = session.execute(
            select(
                LedgerEntry.reference, LedgerEntry.amount_fen, LedgerEntry.created_at
            )
            .where(
                LedgerEntry.account == domain.voucher_account(code, "released"),
                LedgerEntry.created_at >= start,
                LedgerEntry.created_at < end,
            )
            .order_by(LedgerEntry.id)
        ).all()
    finally:
        session.rollback()
    statement = compose(
        before,
        during,
        [row._asdict() for row in rows],
        [row._asdict() for row in releases],
    )
    if not statement["reconciled"]:
        log.error("statement of %s for %s does not reconcile", code, month)
    company = (application.company if application is not None else None) or {}
    program = rules.program(voucher.program_id)
    return {
        "voucher_code": code,
        "month": month,
        "period_start": start,
        "period_end": end,
        "city": rules.city,
        "city_name": rules.name,
        "program_id": voucher.program_id,
        "program_kind": program.kind if program is not None else None,
        "company_id": voucher.company_id,
        "company_name": company.get("name"),
        "face_value_fen": voucher.face_value_fen,
        "issued_at": voucher.issued_at,
        "expires_at": voucher.expires_at,
        "status": voucher.status,
        **statement,
    }
