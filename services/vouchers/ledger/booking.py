"""Booking rated usage: one algorithm for a batch, a single record and a correction.

``book_usage_batch`` books many records in one transaction; ``book_usage`` is
a batch of one. Each (datacenter_id, record_id) changes the ledger at most
once; a redelivered record gets back the rows booked the first time, so that
their ``voucher_redeemed`` events go out again with the same ids. A
correction (``correction_of``) reverses the record it corrects (once) and is
booked in its place; a record whose correction was booked first is refused
as ``superseded``.

The order of work in a batch: lock every voucher it names (and those of the
records it corrects), in code order, then their programs, in id order; then
look up what is done already (under READ COMMITTED every query after the lock
sees what a competing consumer committed before releasing it); then decide
record by record in memory (``domain``); then update each locked row once and
insert the redemptions, rejections and ledger entries in bulk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from operator import attrgetter
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common.contracts import event_id
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.postings import ENTRY_COLUMNS, entry_rows
from services.vouchers.ledger.sql import dialect, insert_rows, lock_rows, writing
from services.vouchers.models import (
    LedgerEntry,
    Program,
    Redemption,
    RejectedUsage,
    Voucher,
)

USAGE = "usage"
REVERSAL = "reversal"

# A batch that collides with a competing consumer (a unique violation) is
# rolled back and booked again this many times before it is split.
ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class RedemptionRow:
    """One row of ``redemptions``, booked now or found booked before."""

    datacenter_id: str
    record_id: str
    kind: str  # usage | reversal
    source_record_id: str  # the record whose arrival wrote the row
    correction_of: str | None
    voucher_code: str
    program_id: str
    gpu_seconds: int
    cost_fen: int
    rate_bp: int
    subsidy_fen: int
    event_id: str
    booked_at: datetime


REDEMPTION_COLUMNS = tuple(f.name for f in fields(RedemptionRow))
_redemption_values = attrgetter(*REDEMPTION_COLUMNS)
REJECTION_COLUMNS = (
    "datacenter_id",
    "record_id",
    "voucher_code",
    "reason",
    "detail",
    "received_at",
)


@dataclass(frozen=True)
class BookingOutcome:
    """What became of one rated record; ``redemptions`` are to be published."""

    redemptions: tuple[RedemptionRow, ...] = ()
    rejected: str | None = None
    duplicate: bool = False


def redeemed_event_id(city: str, datacenter_id: str, record_id: str, kind: str) -> str:
    if kind == USAGE:
        return event_id("voucher_redeemed", city, datacenter_id, record_id)
    return event_id("voucher_redeemed", city, datacenter_id, record_id, kind)


def book_usage(
    session: Session, rules: domain.CityRules, record: Mapping[str, Any]
) -> BookingOutcome:
    """Book the subsidy of one rated record, once: a batch of one."""
    [outcome] = book_usage_batch(session, rules, [record])
    return outcome


def book_usage_batch(
    session: Session, rules: domain.CityRules, records: Sequence[Mapping[str, Any]]
) -> list[BookingOutcome]:
    """Book ``records`` in **one** transaction; their outcomes in their order."""
    if not records:
        return []
    with writing(session):
        for _attempt in range(ATTEMPTS):
            try:
                outcomes = _Batch(session, rules, records).book()
                session.commit()
                return outcomes
            except IntegrityError as exc:
                # A competing consumer booked a record of this batch between
                # our look and our insert: nothing was written; look again.
                session.rollback()
                collided = exc
            except BaseException:
                session.rollback()
                raise
        if len(records) == 1:
            raise collided
        # Still colliding: one record at a time, each in its own transaction.
        return [book_usage(session, rules, record) for record in records]


Key = tuple[str, str]  # (datacenter_id, record_id)


class _Batch:
    """One attempt at booking ``records`` in the session's transaction."""

    def __init__(
        self,
        session: Session,
        rules: domain.CityRules,
        records: Sequence[Mapping[str, Any]],
    ):
        self.session = session
        self.rules = rules
        self.records = records
        self.now = utcnow()
        self.vouchers: dict[str, Voucher] = {}  # locked, by code
        self.programs: dict[str, Program] = {}  # locked, by id
        self.redemptions: list[RedemptionRow] = []
        self.rejections: list[tuple] = []
        self.entries: list[tuple] = []

    def book(self) -> list[BookingOutcome]:
        session, records = self.session, self.records
        first: dict[Key, int] = {}  # a record's first place in the batch
        for n, record in enumerate(records):
            first.setdefault((record["datacenter_id"], record["record_id"]), n)
        corrected = {
            (record["datacenter_id"], record["correction_of"])
            for record in records
            if record.get("correction_of")
        }
        # Corrections are rare. Their originals are looked up before the lock
        # too, so that the vouchers they were booked on are locked in the one
        # ordered statement with the batch's own.
        originals = _originals(session, corrected) if corrected else {}
        self.vouchers = lock_rows(
            session,
            Voucher,
            Voucher.code,
            {r["voucher_code"] for r in records if r.get("voucher_code")}
            | {row.voucher_code for row in originals.values()},
        )
        if corrected - originals.keys():
            # Booked (and committed by a competitor) since the first look.
            originals.update(_originals(session, corrected - originals.keys()))
            self.vouchers.update(
                lock_rows(
                    session,
                    Voucher,
                    Voucher.code,
                    {r.voucher_code for r in originals.values()} - self.vouchers.keys(),
                )
            )
        # Programs FOR NO KEY UPDATE: an issue inserting a voucher of the
        # program (a key-share lock) does not wait for this batch, nor it for
        # the issue.
        self.programs = lock_rows(
            session,
            Program,
            Program.id,
            {v.program_id for v in self.vouchers.values()},
            key_share=True,
        )
        event_ids = {
            key: redeemed_event_id(self.rules.city, *key, USAGE) for key in first
        }
        outcomes, superseded = _already_done(session, event_ids)
        for key, eid in event_ids.items():
            if key not in outcomes:
                outcomes[key] = self._book_one(
                    records[first[key]], key, eid, originals, superseded
                )

        session.flush()  # the balances, before the rows that reference them
        # A unique violation here (a competing consumer, a conflicting
        # duplicate) rolls the whole batch back: book_usage_batch retries.
        insert_rows(
            session,
            Redemption.__table__,
            REDEMPTION_COLUMNS,
            [_redemption_values(row) for row in self.redemptions],
        )
        insert_rows(
            session, RejectedUsage.__table__, REJECTION_COLUMNS, self.rejections
        )
        insert_rows(session, LedgerEntry.__table__, ENTRY_COLUMNS, self.entries)

        result = []
        for n, record in enumerate(records):
            key = (record["datacenter_id"], record["record_id"])
            outcome = outcomes[key]
            if first[key] != n:  # the same record twice in one batch
                outcome = replace(outcome, duplicate=True)
            result.append(outcome)
        return result

    def _book_one(
        self,
        record: Mapping[str, Any],
        key: Key,
        eid: str,
        originals: dict[Key, RedemptionRow],
        superseded: dict[Key, str],
    ) -> BookingOutcome:
        """Decide one new record against the balances as the batch left them."""
        dc, record_id = key
        code = record.get("voucher_code")
        voucher = self.vouchers.get(code or "")
        program = (
            self.rules.program(voucher.program_id) if voucher is not None else None
        )
        attributes = record.get("datacenter") or {}
        problem = domain.usage_problem(
            program,
            voucher.status if voucher is not None else None,
            voucher.expires_at if voucher is not None else None,
            record["started_at"],
            dc,
            attributes,
        )
        detail = f"voucher {code!r}"
        if problem is None and key in superseded:
            problem, detail = domain.SUPERSEDED, f"corrected by {superseded[key]}"
        if problem is not None:
            self.rejections.append(
                (
                    dc,
                    record_id,
                    code[:64] if isinstance(code, str) else None,
                    problem,
                    detail[:512],
                    self.now,
                )
            )
            return BookingOutcome(rejected=problem)

        booked = []
        correction_of = record.get("correction_of") or None
        if correction_of:
            # Popped: a record is reversed at most once, by its first correction.
            original = originals.pop((dc, correction_of), None)
            if original is not None:
                booked.append(self._reverse(original, record_id))
            superseded[(dc, correction_of)] = record_id
        budget = self.programs[voucher.program_id]
        rate_bp = (
            domain.effective_rate_bp(program, attributes)
            if program is not None
            else budget.rate_bp
        )
        subsidy = domain.subsidy_fen(
            record["cost_fen"], rate_bp, voucher.balance_fen, budget.committed_fen
        )
        row = RedemptionRow(
            dc,
            record_id,
            USAGE,
            record_id,
            correction_of,
            voucher.code,
            voucher.program_id,
            record["gpu_seconds"],
            record["cost_fen"],
            rate_bp,
            subsidy,
            eid,
            self.now,
        )
        self._redeem(voucher, budget, row)
        originals[key] = row  # a correction later in the batch reverses it
        booked.append(row)
        return BookingOutcome(tuple(booked))

    def _redeem(self, voucher: Voucher, budget: Program, row: RedemptionRow) -> None:
        """Move ``row``'s subsidy (negative for a reversal) from committed funds
        to redeemed. The rows are locked: plain read-modify-write is safe."""
        subsidy = row.subsidy_fen
        voucher.redeemed_fen += subsidy
        budget.committed_fen -= subsidy
        budget.redeemed_fen += subsidy
        budget.updated_at = self.now
        self.redemptions.append(row)
        self.entries.extend(
            entry_rows(
                domain.redemption_entries(voucher.program_id, voucher.code, subsidy),
                f"{row.kind}:{row.datacenter_id}:{row.record_id}",
                self.now,
            )
        )

    def _reverse(self, original: RedemptionRow, source_record_id: str) -> RedemptionRow:
        """The reversal of ``original``, written because ``source_record_id``
        corrects it."""
        voucher = self.vouchers[original.voucher_code]
        budget = self.programs[voucher.program_id]
        dc, record_id = original.datacenter_id, original.record_id
        row = RedemptionRow(
            dc,
            record_id,
            REVERSAL,
            source_record_id,
            None,
            voucher.code,
            voucher.program_id,
            -original.gpu_seconds,
            -original.cost_fen,
            original.rate_bp,
            -original.subsidy_fen,
            redeemed_event_id(self.rules.city, dc, record_id, REVERSAL),
            self.now,
        )
        if voucher.status == domain.ACTIVE:
            self._redeem(voucher, budget, row)
            return row
        # The voucher is closed: it holds no commitment any more, so the
        # reversed subsidy is released to the budget, not re-committed.
        amount = original.subsidy_fen
        voucher.redeemed_fen -= amount
        voucher.released_fen += amount
        budget.redeemed_fen -= amount
        budget.available_fen += amount
        budget.released_fen += amount
        budget.updated_at = self.now
        self.redemptions.append(row)
        self.entries.extend(
            entry_rows(
                domain.release_entries(
                    voucher.program_id, voucher.code, amount, from_redeemed=True
                ),
                f"reversal-release:{dc}:{record_id}",
                self.now,
            )
        )
        if amount:
            write_event(
                self.session,
                self.rules.city,
                "voucher_released",
                event_id(
                    "voucher_released", self.rules.city, voucher.code, dc, record_id
                ),
                voucher_code=voucher.code,
                program_id=voucher.program_id,
                released_fen=amount,
                reason=voucher.status,
            )
        return row


# --------------------------------------------------------------------------
# What is booked already


# Looked up as plain rows (typed, so that times come back in UTC): loading
# ORM objects only to copy them cost a redelivered batch a quarter more time.
_TABLE = Redemption.__table__
_LOOKED_UP = (_TABLE.c.id, *(_TABLE.c[c] for c in REDEMPTION_COLUMNS))


def _found(session: Session, statement, params=None) -> list[tuple[int, RedemptionRow]]:
    """(id, row) of the redemptions ``statement`` selects (``_LOOKED_UP``)."""
    return [(r[0], RedemptionRow(*r[1:])) for r in session.execute(statement, params)]


def _originals(session: Session, corrected: Iterable[Key]) -> dict[Key, RedemptionRow]:
    """The booked usage rows of the ``corrected`` records not reversed yet."""
    usage, reversed_ = {}, set()
    for dc, record_ids in _by_datacenter(corrected).items():
        statement = select(*_LOOKED_UP).where(
            _TABLE.c.datacenter_id == dc, _TABLE.c.record_id.in_(record_ids)
        )
        for _id, row in _found(session, statement):
            key = (row.datacenter_id, row.record_id)
            if row.kind == USAGE:
                usage[key] = row
            else:
                reversed_.add(key)
    return {key: row for key, row in usage.items() if key not in reversed_}


# The lookups of a batch stay index probes per record in any state of the
# statistics. A fresh city's tables have none until autovacuum analyses them
# (a minute at least), and without them PostgreSQL's plans (custom or the
# generic one of a prepared statement) read the whole table, or a data
# centre's whole prefix of an index, for `… = ANY(ids)`: each batch cost time
# in proportion to every record booked before it. So on PostgreSQL each
# lookup is a LATERAL subquery per id, kept by OFFSET 0 from being flattened
# into a join the planner could misjudge, on a column that only one index
# leads: a record's own row by its unique event id, its corrections through
# the corrections-only index, its rejection by the unique key.
_BOOKED_SQL = text(
    f"SELECT {', '.join(f'r.{c.name}' for c in _LOOKED_UP)} "
    "FROM unnest(CAST(:ids AS TEXT[])) AS k(id) CROSS JOIN LATERAL "
    "(SELECT * FROM redemptions WHERE event_id = k.id OFFSET 0) AS r "
    "ORDER BY r.id"
).columns(*_LOOKED_UP)
_CORRECTIONS_SQL = text(
    "SELECT r.datacenter_id, r.correction_of, r.record_id "
    "FROM unnest(CAST(:ids AS TEXT[])) AS k(id) CROSS JOIN LATERAL "
    "(SELECT id, datacenter_id, correction_of, record_id FROM redemptions "
    f"WHERE correction_of = k.id AND kind = '{USAGE}' OFFSET 0) AS r "
    "ORDER BY r.id"
)
_REJECTED_SQL = text(
    "SELECT r.record_id, r.reason FROM unnest(CAST(:ids AS TEXT[])) AS k(id) "
    "CROSS JOIN LATERAL (SELECT record_id, reason FROM rejected_usage "
    "WHERE datacenter_id = :dc AND record_id = k.id OFFSET 0) AS r"
)


def _booked(session: Session, event_ids: list[str]) -> list[tuple[int, RedemptionRow]]:
    if dialect(session) == "postgresql":
        return _found(session, _BOOKED_SQL, {"ids": event_ids})
    return _found(
        session,
        select(*_LOOKED_UP)
        .where(_TABLE.c.event_id.in_(event_ids))
        .order_by(_TABLE.c.id),
    )


def _corrections(session: Session, record_ids: list[str]):
    """(datacenter_id, corrected record, correction) of the booked corrections
    of ``record_ids`` (in any data centre), in booking order."""
    if dialect(session) == "postgresql":
        return session.execute(_CORRECTIONS_SQL, {"ids": record_ids}).all()
    return session.execute(
        select(Redemption.datacenter_id, Redemption.correction_of, Redemption.record_id)
        .where(Redemption.correction_of.in_(record_ids), Redemption.kind == USAGE)
        .order_by(Redemption.id)
    ).all()


def _rejected(session: Session, dc: str, record_ids: list[str]):
    """(record_id, reason) of those of ``record_ids`` rejected before."""
    if dialect(session) == "postgresql":
        return session.execute(_REJECTED_SQL, {"dc": dc, "ids": record_ids}).all()
    return session.execute(
        select(RejectedUsage.record_id, RejectedUsage.reason).where(
            RejectedUsage.datacenter_id == dc,
            RejectedUsage.record_id.in_(record_ids),
        )
    ).all()


def _by_datacenter(keys: Iterable[Key]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for datacenter_id, record_id in keys:
        grouped.setdefault(datacenter_id, []).append(record_id)
    return grouped


def _already_done(
    session: Session, event_ids: dict[Key, str]
) -> tuple[dict[Key, BookingOutcome], dict[Key, str]]:
    """The outcomes of the records booked or rejected before (their keys → the
    event ids of their bookings), and which records a booked correction
    already replaced (record → its latest correction)."""
    keys = list(event_ids)
    rows = _booked(session, list(event_ids.values()))
    # A record whose row has a correction_of was booked as a correction and
    # wrote a reversal too, under its id as the source: rare, so those are
    # read again with every row they wrote.
    again = {
        (r.datacenter_id, r.source_record_id) for _id, r in rows if r.correction_of
    }
    for dc, record_ids in _by_datacenter(again).items():
        rows += _found(
            session,
            select(*_LOOKED_UP).where(
                _TABLE.c.datacenter_id == dc,
                _TABLE.c.source_record_id.in_(record_ids),
                _TABLE.c.kind == REVERSAL,
            ),
        )
    booked: dict[Key, list[RedemptionRow]] = {}
    for _id, row in sorted(rows, key=lambda r: r[0]) if again else rows:
        booked.setdefault((row.datacenter_id, row.source_record_id), []).append(row)
    done = {
        key: BookingOutcome(tuple(lines), duplicate=True)
        for key, lines in booked.items()
    }
    wanted = set(keys)
    superseded = {
        (dc, corrected): correction
        for dc, corrected, correction in _corrections(
            session, sorted({r for _dc, r in keys})
        )
        if (dc, corrected) in wanted
    }
    for dc, record_ids in _by_datacenter(k for k in keys if k not in done).items():
        for record_id, reason in _rejected(session, dc, record_ids):
            done[(dc, record_id)] = BookingOutcome(rejected=reason, duplicate=True)
    return done, superseded
