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

This module is that order of work, ``_Batch``; what it looks up is in
``lookups``, the rows it writes and answers in ``redemptions``, and what
review decides on arrival (a hold, a replay) in ``arrival``. Review books and
reverses through a ``_Batch`` too (``locked_batch``), so that its ledger
entries are those of any booking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from operator import attrgetter
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common.contracts import event_id
from services.common.db import retry_on_conflict
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger import lookups
from services.vouchers.ledger.arrival import (
    forget_refusals,
    hold_on_arrival,
    replayed_event,
)
from services.vouchers.ledger.bindings import authorised_at
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.postings import ENTRY_COLUMNS, entry_rows
from services.vouchers.ledger.redemptions import (
    REDEMPTION_COLUMNS,
    REVERSAL,
    USAGE,
    BookingOutcome,
    Key,
    RedemptionRow,
    job_of,
    redeemed_event_id,
    refused_event_id,
)
from services.vouchers.ledger.sql import insert_rows, lock_rows, writing
from services.vouchers.models import (
    LedgerEntry,
    Program,
    Redemption,
    RejectedUsage,
    Voucher,
)

_redemption_values = attrgetter(*REDEMPTION_COLUMNS)
REJECTION_COLUMNS = (
    "datacenter_id",
    "record_id",
    "voucher_code",
    "reason",
    "detail",
    "received_at",
)

# A batch that collides with a competing consumer (a unique violation) is
# rolled back and booked again this many times before it is split.
ATTEMPTS = 3


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

    def attempt() -> list[BookingOutcome]:
        try:
            outcomes = _Batch(session, rules, records).book()
            session.commit()
            return outcomes
        except BaseException:
            session.rollback()
            raise

    with writing(session):
        try:
            # A competing consumer may book a record of this batch between
            # our look and our insert: nothing was written; look again.
            return retry_on_conflict(attempt, ATTEMPTS)
        except IntegrityError:
            if len(records) == 1:
                raise
        # Still colliding: one record at a time, each in its own transaction.
        return [book_usage(session, rules, record) for record in records]


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
        # (voucher, data centre, tenant) → when the holder authorised it
        self.authorised: dict[tuple[str, str, str], datetime] = {}
        self.redemptions: list[RedemptionRow] = []
        self.rejections: list[tuple] = []
        self.entries: list[tuple] = []
        # Review (arrival.py): replayed records whose refusal was forgotten
        # (key → the replay's event id); holds that came before their record.
        self.replayed: dict[Key, str] = {}
        self.awaiting: dict[Key, dict] = {}

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
        originals = lookups.originals(session, corrected) if corrected else {}
        self.vouchers = lock_rows(
            session,
            Voucher,
            Voucher.code,
            {r["voucher_code"] for r in records if r.get("voucher_code")}
            | {row.voucher_code for row in originals.values()},
        )
        if corrected - originals.keys():
            # Booked (and committed by a competitor) since the first look.
            originals.update(lookups.originals(session, corrected - originals.keys()))
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
        # After the voucher locks: a withdrawal (which takes them too) is
        # either committed and seen here, or waits for this batch.
        self.authorised = authorised_at(
            session,
            {
                (r["voucher_code"], r["datacenter_id"], r["tenant_id"])
                for r in records
                if r.get("voucher_code") in self.vouchers
            },
        )
        event_ids = {
            key: redeemed_event_id(self.rules.city, *key, USAGE) for key in first
        }
        replays = {
            key: records[n]["event_id"]
            for key, n in first.items()
            if records[n].get("replay")
        }
        if replays:  # an operator's replay: its refusal is decided again
            self.replayed = forget_refusals(session, replays, self.now)
        outcomes, superseded = lookups.already_done(session, event_ids, self.awaiting)
        for key, eid in event_ids.items():
            if key not in outcomes:
                outcomes[key] = self._book_one(
                    records[first[key]], key, eid, originals, superseded
                )
        self.write()

        result = []
        for n, record in enumerate(records):
            key = (record["datacenter_id"], record["record_id"])
            outcome = outcomes[key]
            if first[key] != n:  # the same record twice in one batch
                outcome = replace(outcome, duplicate=True)
            result.append(outcome)
        return result

    def write(self) -> None:
        """Insert the rows this batch decided, in its transaction."""
        session = self.session
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
        self.redemptions, self.rejections, self.entries = [], [], []

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
            ended_at=record["ended_at"],
            issued_at=voucher.issued_at if voucher is not None else None,
            authorised_at=self.authorised.get((code, dc, record["tenant_id"])),
            now=self.now,
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
            return BookingOutcome(
                rejected=problem, events=(self._refused(record, problem, detail),)
            )
        hold = record.get("hold") or self.awaiting.get(key)
        if hold:
            budget = self.programs[voucher.program_id]
            return hold_on_arrival(self, record, voucher, budget, program, hold)

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
            *job_of(record),
        )
        self._redeem(voucher, budget, row)
        originals[key] = row  # a correction later in the batch reverses it
        booked.append(row)
        if key in self.replayed:  # a refusal undone: say so (arrival.py)
            event = replayed_event(self, key, voucher.code, subsidy)
            return BookingOutcome(tuple(booked), events=(event,))
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

    def _refused(self, record: Mapping[str, Any], reason: str, detail: str):
        """The ``usage_refused`` of a record this batch refuses (outbox)."""
        dc, record_id = record["datacenter_id"], record["record_id"]
        code = record.get("voucher_code")
        return write_event(
            self.session,
            self.rules.city,
            "usage_refused",
            refused_event_id(
                self.rules.city, dc, record_id, self.replayed.get((dc, record_id))
            ),
            record_id=record_id,
            datacenter_id=dc,
            voucher_code=code if isinstance(code, str) else None,
            reason=reason,
            detail=detail[:512],
        )

    def _reverse(
        self, original: RedemptionRow, source_record_id: str, kind: str = REVERSAL
    ) -> RedemptionRow:
        """The reversal of ``original``, written because ``source_record_id``
        corrects it (or, with another ``kind``, because a review takes its
        subsidy back)."""
        voucher = self.vouchers[original.voucher_code]
        budget = self.programs[voucher.program_id]
        dc, record_id = original.datacenter_id, original.record_id
        row = RedemptionRow(
            dc,
            record_id,
            kind,
            source_record_id,
            None,
            voucher.code,
            voucher.program_id,
            -original.gpu_seconds,
            -original.cost_fen,
            original.rate_bp,
            -original.subsidy_fen,
            redeemed_event_id(self.rules.city, dc, record_id, kind),
            self.now,
            *job_of(original),
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
                f"{kind}-release:{dc}:{record_id}",
                self.now,
            )
        )
        if amount:
            write_event(
                self.session,
                self.rules.city,
                "voucher_released",
                event_id(
                    "voucher_released",
                    self.rules.city,
                    voucher.code,
                    dc,
                    record_id,
                    *(() if kind == REVERSAL else (kind,)),
                ),
                voucher_code=voucher.code,
                program_id=voucher.program_id,
                released_fen=amount,
                reason=voucher.status,
            )
        return row


def locked_batch(session: Session, rules: domain.CityRules, code: str) -> _Batch:
    """A batch of no records holding the voucher's and its program's locks."""
    batch = _Batch(session, rules, [])
    batch.vouchers = lock_rows(session, Voucher, Voucher.code, [code])
    batch.programs = lock_rows(
        session,
        Program,
        Program.id,
        {v.program_id for v in batch.vouchers.values()},
        key_share=True,
    )
    return batch
