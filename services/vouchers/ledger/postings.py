"""Money moves every ledger operation writes: entries and budget shifts.

``ledger_entries`` is append-only; the balances on ``programs`` and
``vouchers`` rows are caches of its sums (``queries.check_ledger`` proves it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from services.vouchers.models import LedgerEntry, Program

# The columns of a ledger entry as ``entry_rows`` yields them.
ENTRY_COLUMNS = ("account", "amount_fen", "reference", "created_at")


def entry_rows(
    entries: Iterable[tuple[str, int]], reference: str, now: datetime
) -> Iterator[tuple[str, int, str, datetime]]:
    """The ledger rows of ``entries`` (account, amount): a zero moves nothing."""
    for account, amount in entries:
        if amount:
            yield account, amount, reference, now


def post(
    session: Session, entries: Iterable[tuple[str, int]], reference: str, now: datetime
) -> None:
    """Append ``entries`` to the ledger in the session's transaction."""
    session.add_all(
        LedgerEntry(**dict(zip(ENTRY_COLUMNS, row, strict=True)))
        for row in entry_rows(entries, reference, now)
    )


def shift_program(
    session: Session, program_id: str, now: datetime, **deltas_fen: int
) -> None:
    """Move money between a program's budget states: ``committed=-x, redeemed=x``.

    A relative update (the database adds), so no read-modify-write is lost
    between concurrent writers on the same program.
    """
    values = {
        f"{state}_fen": getattr(Program, f"{state}_fen") + delta
        for state, delta in deltas_fen.items()
    }
    session.execute(
        update(Program).where(Program.id == program_id).values(**values, updated_at=now)
    )
