"""The city's ledger in its database: each operation is one transaction.

``domain`` decides; this module locks, writes the rows and the append-only
ledger entries, and commits. Concurrent bookings on one voucher are serialised
by ``SELECT … FOR UPDATE`` on PostgreSQL; SQLite has no row locks, so there a
process-wide lock wraps every writing transaction (and SQLite serialises
writers between processes itself).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common import vouchercode
from services.common.contracts import event_id
from services.common.errors import Conflict, NotFound
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.models import (
    Application,
    LedgerEntry,
    Program,
    Redemption,
    RejectedUsage,
    Voucher,
)

USAGE = "usage"
REVERSAL = "reversal"

# Greenthreads (and threads) of this process writing a SQLite database.
_SQLITE_WRITE_LOCK = threading.RLock()


@contextmanager
def _writing(session: Session) -> Iterator[None]:
    if session.get_bind().dialect.name == "sqlite":
        with _SQLITE_WRITE_LOCK:
            yield
    else:
        yield


def _locked(session: Session, statement):
    """``statement`` FOR UPDATE where the database has row locks."""
    if session.get_bind().dialect.name == "sqlite":
        return statement
    return statement.with_for_update()


def _post(
    session: Session, entries: list[tuple[str, int]], reference: str, now: datetime
):
    for account, amount in entries:
        if amount:
            session.add(
                LedgerEntry(
                    account=account,
                    amount_fen=amount,
                    reference=reference,
                    created_at=now,
                )
            )


# --------------------------------------------------------------------------
# Programs


def sync_programs(session: Session, rules: domain.CityRules) -> None:
    """Make the program rows match the rules file (run at every start).

    A new program is funded with its budget; a changed budget moves the
    difference into (or out of) available funds, never below zero.
    """
    now = utcnow()
    with _writing(session):
        try:
            for program in rules.programs:
                row = session.execute(
                    _locked(session, select(Program).where(Program.id == program.id))
                ).scalar_one_or_none()
                reference = f"budget:{rules.version}:{rules.sha256[:12]}"
                if row is None:
                    row = Program(
                        id=program.id,
                        kind=program.kind,
                        budget_fen=program.budget_fen,
                        available_fen=program.budget_fen,
                        committed_fen=0,
                        redeemed_fen=0,
                        released_fen=0,
                    )
                    session.add(row)
                    delta = program.budget_fen
                else:
                    delta = program.budget_fen - row.budget_fen
                    if row.available_fen + delta < 0:
                        raise ValueError(
                            f"{rules.source}: program {program.id}: budget "
                            f"{program.budget_fen // 100} CNY is below what is already "
                            f"committed and redeemed "
                            f"({(row.committed_fen + row.redeemed_fen) // 100} CNY)"
                        )
                    row.budget_fen += delta
                    row.available_fen += delta
                row.kind = program.kind
                row.rate_bp = program.rate_bp
                row.max_rate_bp = program.max_rate_bp
                row.rules_version = rules.version
                row.rules_sha256 = rules.sha256
                row.updated_at = now
                _post(
                    session,
                    [(domain.program_account(program.id, "available"), delta)],
                    reference,
                    now,
                )
            session.commit()
        except BaseException:
            session.rollback()
            raise


def program_states(session: Session, rules: domain.CityRules) -> list[dict[str, Any]]:
    ids = [p.id for p in rules.programs]
    rows = {
        r.id: r for r in session.scalars(select(Program).where(Program.id.in_(ids)))
    }
    session.rollback()  # end the read transaction
    return [
        {
            "program_id": row.id,
            "kind": row.kind,
            "budget_fen": row.budget_fen,
            "rate_bp": row.rate_bp,
            "max_rate_bp": row.max_rate_bp,
            "available_fen": row.available_fen,
            "committed_fen": row.committed_fen,
            "redeemed_fen": row.redeemed_fen,
            "released_fen": row.released_fen,
            "rules_version": row.rules_version,
            "rules_sha256": row.rules_sha256,
        }
        for row in (rows[i] for i in ids if i in rows)
    ]


# --------------------------------------------------------------------------
# Applications and issue


@dataclass
class ApplicationResult:
    application: Application
    voucher: Voucher | None


def apply(
    session: Session,
    rules: domain.CityRules,
    program: domain.Program,
    company: Mapping[str, Any],
    face_value_fen: int,
    decision: domain.Decision,
) -> ApplicationResult:
    """Store the decision; when approved, issue a voucher from the budget.

    Raises ``Conflict`` (nothing stored) when the company already holds an
    active voucher of the program or the budget cannot cover the face value.
    """
    now = utcnow()
    application = Application(
        id=str(uuid.uuid4()),
        program_id=program.id,
        company_id=company["registration_id"],
        company=_jsonable(company),
        requested_face_value_fen=face_value_fen,
        decision=decision.decision,
        reasons=[r.as_dict() for r in decision.reasons],
        rules_version=rules.version,
        rules_sha256=rules.sha256,
        decided_at=now,
    )
    voucher = None
    with _writing(session):
        try:
            if decision.decision == domain.APPROVED:
                voucher = _issue(
                    session, rules, program, application, face_value_fen, now
                )
            session.add(application)
            session.commit()
        except IntegrityError as exc:
            session.rollback()
            # Lost a race with a concurrent application of the same company.
            raise Conflict(
                "active_voucher_exists",
                f"{application.company_id} already holds an active voucher "
                f"of {program.id}",
            ) from exc
        except BaseException:
            session.rollback()
            raise
    return ApplicationResult(application, voucher)


def _issue(
    session: Session,
    rules: domain.CityRules,
    program: domain.Program,
    application: Application,
    face_value_fen: int,
    now: datetime,
) -> Voucher:
    # The program row lock serialises issues of one program, which also makes
    # the one-active-voucher check below race-free (the unique index backs it).
    row = session.execute(
        _locked(session, select(Program).where(Program.id == program.id))
    ).scalar_one_or_none()
    if row is None:
        raise NotFound("program_not_found", f"no program {program.id}")
    held = session.scalar(
        select(Voucher.code).where(
            Voucher.company_id == application.company_id,
            Voucher.program_id == program.id,
            Voucher.status == domain.ACTIVE,
        )
    )
    if held is not None:
        raise Conflict(
            "active_voucher_exists",
            f"{application.company_id} already holds active voucher {held} "
            f"of {program.id}",
            {"voucher_code": held},
        )
    if row.available_fen < face_value_fen:
        raise Conflict(
            "budget_exhausted",
            f"program {program.id} has {row.available_fen} fen available, "
            f"{face_value_fen} fen requested",
            {"available_fen": row.available_fen},
        )
    code = vouchercode.generate(rules.voucher_prefix)
    voucher = Voucher(
        code=code,
        program_id=program.id,
        company_id=application.company_id,
        application_id=application.id,
        status=domain.ACTIVE,
        face_value_fen=face_value_fen,
        redeemed_fen=0,
        released_fen=0,
        issued_at=now,
        expires_at=now + timedelta(days=program.valid_days),
    )
    row.available_fen -= face_value_fen
    row.committed_fen += face_value_fen
    row.updated_at = now
    application.voucher_code = code
    session.add(application)
    session.flush()  # the application before the voucher that references it
    session.add(voucher)
    _post(
        session,
        domain.issue_entries(program.id, code, face_value_fen),
        f"issue:{code}",
        now,
    )
    return voucher


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def get_voucher(
    session: Session, code: str, limit: int = 100
) -> tuple[Voucher, list, int]:
    """The voucher, its latest ``limit`` redemption lines, and how many there are."""
    voucher = session.get(Voucher, code)
    if voucher is None:
        session.rollback()
        raise NotFound("voucher_not_found", f"no voucher {code}")
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


# --------------------------------------------------------------------------
# Usage


@dataclass
class BookingOutcome:
    """What became of one rated record; ``redemptions`` are to be published."""

    redemptions: list[Redemption] = field(default_factory=list)
    rejected: str | None = None
    duplicate: bool = False


def _redeemed_event_id(city: str, datacenter_id: str, record_id: str, kind: str) -> str:
    if kind == USAGE:
        return event_id("voucher_redeemed", city, datacenter_id, record_id)
    return event_id("voucher_redeemed", city, datacenter_id, record_id, kind)


def book_usage(
    session: Session, rules: domain.CityRules, record: Mapping[str, Any]
) -> BookingOutcome:
    """Book the subsidy of one rated record, once; reverse what it corrects.

    Redelivered: changes nothing and returns the rows booked the first time,
    so that their events are published again with the same ids.
    """
    with _writing(session):
        try:
            outcome = _book(session, rules, record)
            session.commit()
            return outcome
        except IntegrityError:
            # A competing consumer booked the same record first.
            session.rollback()
            outcome = _already_done(
                session, record["datacenter_id"], record["record_id"]
            )
            session.rollback()
            if outcome is None:
                raise
            return outcome
        except BaseException:
            session.rollback()
            raise


def _already_done(
    session: Session, datacenter_id: str, record_id: str
) -> BookingOutcome | None:
    rows = list(
        session.scalars(
            select(Redemption)
            .where(
                Redemption.datacenter_id == datacenter_id,
                Redemption.source_record_id == record_id,
            )
            .order_by(Redemption.id)
        )
    )
    if rows:
        return BookingOutcome(redemptions=rows, duplicate=True)
    rejected = session.scalar(
        select(RejectedUsage.reason).where(
            RejectedUsage.datacenter_id == datacenter_id,
            RejectedUsage.record_id == record_id,
        )
    )
    if rejected is not None:
        return BookingOutcome(rejected=rejected, duplicate=True)
    return None


def _reject(session: Session, record: Mapping[str, Any], reason: str, detail: str):
    code = record.get("voucher_code")
    session.add(
        RejectedUsage(
            datacenter_id=record["datacenter_id"],
            record_id=record["record_id"],
            voucher_code=code[:64] if isinstance(code, str) else None,
            reason=reason,
            detail=detail[:512],
            received_at=utcnow(),
        )
    )
    return BookingOutcome(rejected=reason)


def _book(
    session: Session, rules: domain.CityRules, record: Mapping[str, Any]
) -> BookingOutcome:
    dc, record_id = record["datacenter_id"], record["record_id"]
    done = _already_done(session, dc, record_id)
    if done is not None:
        return done
    attributes = record.get("datacenter") or {}
    now = utcnow()

    original = None
    if record.get("correction_of"):
        original = session.scalar(
            select(Redemption).where(
                Redemption.datacenter_id == dc,
                Redemption.record_id == record["correction_of"],
                Redemption.kind == USAGE,
            )
        )
        if original is not None and session.scalar(
            select(Redemption.id).where(
                Redemption.datacenter_id == dc,
                Redemption.record_id == original.record_id,
                Redemption.kind == REVERSAL,
            )
        ):
            original = None  # already reversed by an earlier correction

    # Lock every voucher this record touches, in a fixed order (no deadlock).
    codes = {
        c for c in (record.get("voucher_code"), original and original.voucher_code) if c
    }
    vouchers = {
        v.code: v
        for v in session.scalars(
            _locked(session, select(Voucher).where(Voucher.code.in_(sorted(codes))))
        )
    }
    voucher = vouchers.get(record.get("voucher_code") or "")
    program = rules.program(voucher.program_id) if voucher is not None else None
    problem = domain.usage_problem(
        program,
        voucher.status if voucher is not None else None,
        voucher.expires_at if voucher is not None else None,
        record["started_at"],
        dc,
        attributes,
    )
    if problem is not None:
        return _reject(
            session, record, problem, f"voucher {record.get('voucher_code')!r}"
        )
    superseded = session.scalar(
        select(Redemption.record_id).where(
            Redemption.datacenter_id == dc,
            Redemption.correction_of == record_id,
            Redemption.kind == USAGE,
        )
    )
    if superseded is not None:
        return _reject(session, record, domain.SUPERSEDED, f"corrected by {superseded}")

    outcome = BookingOutcome()
    if original is not None:
        # TODO(expiry issue): a reversal on a released voucher must return the
        # amount to available funds instead of the voucher's commitment.
        outcome.redemptions.append(
            _write_redemption(
                session,
                rules,
                vouchers[original.voucher_code],
                kind=REVERSAL,
                datacenter_id=dc,
                record_id=original.record_id,
                source_record_id=record_id,
                correction_of=None,
                gpu_seconds=-original.gpu_seconds,
                cost_fen=-original.cost_fen,
                rate_bp=original.rate_bp,
                subsidy=-original.subsidy_fen,
                now=now,
            )
        )

    rate_bp = (
        domain.effective_rate_bp(program, attributes)
        if program is not None
        else _program_row(session, voucher.program_id).rate_bp
    )
    committed = _program_row(session, voucher.program_id).committed_fen
    subsidy = domain.subsidy_fen(
        record["cost_fen"], rate_bp, voucher.balance_fen, committed
    )
    outcome.redemptions.append(
        _write_redemption(
            session,
            rules,
            voucher,
            kind=USAGE,
            datacenter_id=dc,
            record_id=record_id,
            source_record_id=record_id,
            correction_of=record.get("correction_of"),
            gpu_seconds=record["gpu_seconds"],
            cost_fen=record["cost_fen"],
            rate_bp=rate_bp,
            subsidy=subsidy,
            now=now,
        )
    )
    return outcome


def _program_row(session: Session, program_id: str) -> Program:
    session.flush()
    return session.execute(
        select(Program)
        .where(Program.id == program_id)
        .execution_options(populate_existing=True)
    ).scalar_one()


def _write_redemption(
    session: Session,
    rules: domain.CityRules,
    voucher: Voucher,
    *,
    kind: str,
    datacenter_id: str,
    record_id: str,
    source_record_id: str,
    correction_of: str | None,
    gpu_seconds: int,
    cost_fen: int,
    rate_bp: int,
    subsidy: int,
    now: datetime,
) -> Redemption:
    row = Redemption(
        datacenter_id=datacenter_id,
        record_id=record_id,
        kind=kind,
        source_record_id=source_record_id,
        correction_of=correction_of,
        voucher_code=voucher.code,
        program_id=voucher.program_id,
        gpu_seconds=gpu_seconds,
        cost_fen=cost_fen,
        rate_bp=rate_bp,
        subsidy_fen=subsidy,
        event_id=_redeemed_event_id(rules.city, datacenter_id, record_id, kind),
        booked_at=now,
    )
    session.add(row)
    voucher.redeemed_fen += subsidy
    # Relative updates: the database adds, so no read-modify-write is lost.
    session.execute(
        update(Program)
        .where(Program.id == voucher.program_id)
        .values(
            committed_fen=Program.committed_fen - subsidy,
            redeemed_fen=Program.redeemed_fen + subsidy,
            updated_at=now,
        )
    )
    _post(
        session,
        domain.redemption_entries(voucher.program_id, voucher.code, subsidy),
        f"{kind}:{datacenter_id}:{record_id}",
        now,
    )
    return row


# --------------------------------------------------------------------------
# Reconciliation


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
        columns = {
            "available": row.available_fen,
            "committed": row.committed_fen,
            "redeemed": row.redeemed_fen,
            "released": row.released_fen,
        }
        for column, value in columns.items():
            ledger = int(sums.get(domain.program_account(row.id, column)) or 0)
            if ledger != value:
                problems.append(
                    f"program {row.id}: {column} {value} but ledger says {ledger}"
                )
            if value < 0:
                problems.append(f"program {row.id}: {column} {value} is negative")
        total = row.available_fen + row.committed_fen + row.redeemed_fen
        if total != row.budget_fen:
            problems.append(
                f"program {row.id}: available+committed+redeemed {total} "
                f"!= budget {row.budget_fen}"
            )
    for voucher in session.scalars(select(Voucher).order_by(Voucher.code)):
        columns = {
            "face": voucher.face_value_fen,
            "redeemed": voucher.redeemed_fen,
            "released": voucher.released_fen,
        }
        for column, value in columns.items():
            ledger = int(sums.get(domain.voucher_account(voucher.code, column)) or 0)
            if ledger != value:
                problems.append(
                    f"voucher {voucher.code}: {column} {value} but ledger says {ledger}"
                )
        if voucher.balance_fen < 0:
            problems.append(
                f"voucher {voucher.code}: balance {voucher.balance_fen} is negative"
            )
    session.rollback()
    return problems


class CityLedger:
    """What a worker gets injected: one session and the city's rules."""

    def __init__(self, session: Session, rules: domain.CityRules):
        self.session = session
        self.rules = rules

    def apply(self, program, company, face_value_fen, decision) -> ApplicationResult:
        return apply(
            self.session, self.rules, program, company, face_value_fen, decision
        )

    def book_usage(self, record: Mapping[str, Any]) -> BookingOutcome:
        return book_usage(self.session, self.rules, record)

    def get_voucher(self, code: str):
        return get_voucher(self.session, code)

    def program_states(self) -> list[dict[str, Any]]:
        return program_states(self.session, self.rules)

    def check(self) -> list[str]:
        return check_ledger(self.session)
