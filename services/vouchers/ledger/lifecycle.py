"""After the application: a reviewer's verdict, and a voucher's end by expiry
or revocation (its unspent balance goes back to the program's budget)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from services.common.contracts import event_id
from services.common.errors import Conflict, NotFound
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger.issue import ApplicationResult, issue, one_active_voucher
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.postings import post, shift_program
from services.vouchers.ledger.queries import not_found
from services.vouchers.ledger.sql import dialect, locked, transaction
from services.vouchers.models import Application, OutboxEvent, Voucher


def review(
    session: Session,
    rules: domain.CityRules,
    application_id: str,
    approve: bool,
    reason: str,
    reviewer: str,
) -> ApplicationResult:
    """A city admin's verdict on a pending application; approval issues.

    ``Conflict application_not_pending`` when it was decided already; a
    failed issue (budget, an active voucher) leaves it pending.
    """
    now = utcnow()
    race = "the company already holds an active voucher of the program"
    with one_active_voucher(race), transaction(session):
        application = _locked_one(session, Application.id, application_id)
        _expect(
            application.decision,
            domain.PENDING_REVIEW,
            "application_not_pending",
            f"application {application_id}",
            "decision",
        )
        program = rules.program(application.program_id)
        if program is None:
            raise NotFound(
                "program_not_found",
                f"program {application.program_id} is no longer in the rules",
            )
        voucher, events = None, []
        if approve:
            voucher, event = issue(
                session,
                rules,
                program,
                application,
                application.requested_face_value_fen,
                now,
            )
            events.append(event)
        application.decision = domain.APPROVED if approve else domain.REJECTED
        application.reasons = [
            *application.reasons,
            {"rule": "manual_review", "passed": approve, "evidence": reason},
        ]
        application.reviewed_by = reviewer
        application.reviewed_at = now
        application.review_reason = reason
    return ApplicationResult(application, voucher, events)


def _close(
    session: Session,
    rules: domain.CityRules,
    voucher: Voucher,
    status: str,
    actor: str,
    reason: str,
    now: datetime,
) -> OutboxEvent:
    """Close an active voucher and release its unspent balance to the budget."""
    amount = voucher.balance_fen
    voucher.status = status
    voucher.released_fen += amount
    voucher.closed_at = now
    voucher.closed_by = actor
    voucher.close_reason = reason[:512]
    shift_program(
        session,
        voucher.program_id,
        now,
        committed=-amount,
        available=amount,
        released=amount,
    )
    post(
        session,
        domain.release_entries(voucher.program_id, voucher.code, amount),
        f"{status}:{voucher.code}",
        now,
    )
    return write_event(
        session,
        rules.city,
        "voucher_released",
        event_id("voucher_released", rules.city, voucher.code),
        voucher_code=voucher.code,
        program_id=voucher.program_id,
        released_fen=amount,
        reason=status,
    )


def expire_due(
    session: Session,
    rules: domain.CityRules,
    now: datetime | None = None,
    limit: int = 200,
) -> list[OutboxEvent]:
    """Expire up to ``limit`` active vouchers whose grace period is over, in
    one transaction; until then a voucher stays active, and books the late
    records of jobs that ended by its expiry.

    Vouchers another copy of the service is closing are skipped (SKIP LOCKED).
    """
    now = now or utcnow()
    with transaction(session):
        # The index on (status, expires_at) finds the candidates, each
        # program's by its own grace period; domain.due_to_expire is the rule.
        statement = (
            select(Voucher)
            .where(Voucher.status == domain.ACTIVE, _past_grace(rules, now))
            .order_by(Voucher.code)
            .limit(limit)
        )
        if dialect(session) != "sqlite":
            statement = statement.with_for_update(skip_locked=True)
        return [
            _close(session, rules, v, domain.EXPIRED, "system", "expired", now)
            for v in session.scalars(statement).all()
            if domain.due_to_expire(v.status, v.expires_at, _grace(rules, v), now)
        ]


def _grace(rules: domain.CityRules, voucher: Voucher) -> int:
    program = rules.program(voucher.program_id)
    return program.grace_days if program is not None else domain.DEFAULT_GRACE_DAYS


def _past_grace(rules: domain.CityRules, now: datetime):
    """SQL: the voucher's grace period ended by ``now`` (a program no longer
    in the rules has the default one)."""
    ids = [program.id for program in rules.programs]
    return or_(
        *(
            and_(
                Voucher.program_id == program.id,
                Voucher.expires_at <= now - timedelta(days=program.grace_days),
            )
            for program in rules.programs
        ),
        and_(
            Voucher.program_id.not_in(ids),
            Voucher.expires_at <= now - timedelta(days=domain.DEFAULT_GRACE_DAYS),
        ),
    )


def revoke(
    session: Session, rules: domain.CityRules, code: str, reason: str, actor: str
) -> tuple[Voucher, OutboxEvent]:
    """A city admin revokes an active voucher; its balance is released."""
    with transaction(session):
        voucher = _locked_one(session, Voucher.code, code)
        _expect(
            voucher.status,
            domain.ACTIVE,
            "voucher_not_active",
            f"voucher {code}",
            "status",
        )
        event = _close(session, rules, voucher, domain.REVOKED, actor, reason, utcnow())
    return voucher, event


def _locked_one(session: Session, key: InstrumentedAttribute, value: str) -> Any:
    """The row whose ``key`` is ``value``, locked; ``NotFound`` without one."""
    model = key.class_
    row = session.execute(
        locked(session, select(model).where(key == value))
    ).scalar_one_or_none()
    if row is None:
        raise not_found(model, value)
    return row


def _expect(state: str, wanted: str, code: str, what: str, field: str) -> None:
    """``Conflict code`` unless ``what`` (its ``field``) is in state ``wanted``."""
    if state != wanted:
        raise Conflict(code, f"{what} is {state}", {field: state})
