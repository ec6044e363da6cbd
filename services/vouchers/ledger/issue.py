"""Applications and the issue of vouchers from a program's budget.

``domain`` decides (eligibility, one active voucher per company and program,
the budget's cover); the partial unique index on active vouchers and the
program row's lock keep those decisions true under concurrent applications.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common import vouchercode
from services.common.contracts import event_id
from services.common.errors import Conflict, NotFound
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.postings import post, shift_program
from services.vouchers.ledger.sql import locked, transaction
from services.vouchers.models import Application, OutboxEvent, Program, Voucher


@dataclass
class ApplicationResult:
    application: Application
    voucher: Voucher | None
    events: list[OutboxEvent] = field(default_factory=list)


@contextmanager
def one_active_voucher(message: str) -> Iterator[None]:
    """Around a transaction that issues: a unique violation means a concurrent
    twin issued the company's active voucher of the program first."""
    try:
        yield
    except IntegrityError as exc:
        raise Conflict(domain.ACTIVE_VOUCHER_EXISTS, message) from exc


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
    events = []
    race = f"{application.company_id} already holds an active voucher of {program.id}"
    with one_active_voucher(race), transaction(session):
        if decision.decision == domain.APPROVED:
            voucher, event = issue(
                session, rules, program, application, face_value_fen, now
            )
            events.append(event)
        session.add(application)
    return ApplicationResult(application, voucher, events)


def issue(
    session: Session,
    rules: domain.CityRules,
    program: domain.Program,
    application: Application,
    face_value_fen: int,
    now: datetime,
) -> tuple[Voucher, OutboxEvent]:
    """Issue ``application``'s voucher in the session's transaction."""
    # No lock yet: the unique index on active vouchers is what makes the
    # one-active-voucher rule race-free (a concurrent twin fails on insert).
    held = domain.active_voucher(
        session.execute(
            select(Voucher.code, Voucher.status).where(
                Voucher.company_id == application.company_id,
                Voucher.program_id == program.id,
            )
        ).all()
    )
    if held is not None:
        raise Conflict(
            domain.ACTIVE_VOUCHER_EXISTS,
            f"{application.company_id} already holds active voucher {held} "
            f"of {program.id}",
            {"voucher_code": held},
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
        expires_at=domain.expiry_date(now, program.valid_days),
    )
    application.voucher_code = code
    session.add(application)
    session.flush()  # the application before the voucher that references it
    session.add(voucher)
    post(
        session,
        domain.issue_entries(program.id, code, face_value_fen),
        f"issue:{code}",
        now,
    )
    event = write_event(
        session,
        rules.city,
        "voucher_issued",
        event_id("voucher_issued", rules.city, code),
        voucher_code=code,
        program_id=program.id,
        face_value_fen=face_value_fen,
        expires_at=voucher.expires_at,
    )
    session.flush()
    _fund(session, program.id, face_value_fen, now)
    return voucher, event


def _fund(session: Session, program_id: str, face_value_fen: int, now: datetime):
    """Commit ``face_value_fen`` of the program's available funds, or refuse.

    The budget last: its row is locked only from here to the commit, so
    concurrent issues queue for two statements and a commit instead of for
    the whole transaction.
    """
    available = session.scalar(
        locked(
            session,
            select(Program.available_fen).where(Program.id == program_id),
            key_share=True,
        )
    )
    if available is None:
        raise NotFound("program_not_found", f"no program {program_id}")
    if not domain.covers(available, face_value_fen):
        raise Conflict(
            domain.BUDGET_EXHAUSTED,
            f"program {program_id} has {available} fen available, "
            f"{face_value_fen} fen requested",
            {"available_fen": available},
        )
    shift_program(
        session,
        program_id,
        now,
        available=-face_value_fen,
        committed=face_value_fen,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
