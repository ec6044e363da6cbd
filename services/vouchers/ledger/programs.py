"""The program rows: funded from the rules file at every start, and announced."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.common.contracts import event_id
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.postings import post
from services.vouchers.ledger.sql import locked, transaction
from services.vouchers.models import OutboxEvent, Program


def sync_programs(session: Session, rules: domain.CityRules) -> None:
    """Make the program rows match the rules file (run at every start).

    A new program is funded with its budget; a changed budget moves the
    difference into (or out of) available funds, never below zero.
    """
    now = utcnow()
    with transaction(session):
        for program in rules.programs:
            row = session.execute(
                locked(session, select(Program).where(Program.id == program.id))
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
            post(
                session,
                [(domain.program_account(program.id, "available"), delta)],
                reference,
                now,
            )
        session.flush()
        # The funding and its announcement commit together; one event per
        # rules file (a restart on the same rules re-announces nothing new).
        eid = event_id("program_published", rules.city, "rules", rules.sha256)
        if (
            session.scalar(select(OutboxEvent.id).where(OutboxEvent.event_id == eid))
            is None
        ):
            program_published(session, rules, eid)


def program_published(
    session: Session, rules: domain.CityRules, eid: str
) -> OutboxEvent:
    """Write the ``program_published`` event of the programs as they stand."""
    rows = {r.id: r for r in session.scalars(select(Program))}
    return write_event(
        session,
        rules.city,
        "program_published",
        eid,
        name=rules.name,
        region=rules.region,
        voucher_prefix=rules.voucher_prefix,
        programs=[
            domain.program_summary(
                p,
                rules.version,
                rules.sha256,
                rows[p.id].budget_fen,
                rows[p.id].available_fen,
                rows[p.id].committed_fen,
                rows[p.id].redeemed_fen,
            )
            for p in rules.programs
            if p.id in rows
        ],
    )


def program_states(session: Session, rules: domain.CityRules) -> list[dict[str, Any]]:
    """Each program of the rules as its row stands: budget, rates, balances."""
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
