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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import psycopg
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from services.common import vouchercode
from services.common.contracts import event_id, make_event
from services.common.errors import Conflict, InvalidRequest, NotFound
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.models import (
    Application,
    LedgerEntry,
    OutboxEvent,
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


def _locked(session: Session, statement, *, key_share: bool = False):
    """``statement`` FOR UPDATE where the database has row locks.

    Always re-read: a session that committed earlier keeps its objects
    (``expire_on_commit=False``), and a locking read that returned those stale
    values would lose the updates other transactions committed in between.
    ``key_share`` locks FOR NO KEY UPDATE, which still excludes every other
    writer but not the key-share locks of inserts referencing the row.
    """
    statement = statement.execution_options(populate_existing=True)
    if session.get_bind().dialect.name == "sqlite":
        return statement
    return statement.with_for_update(key_share=key_share)


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


def _outbox(
    session: Session, city: str, event: str, eid: str, **fields: Any
) -> OutboxEvent:
    """Write ``event`` in the current transaction; published after the commit."""
    row = OutboxEvent(
        event_id=eid,
        event=event,
        body=make_event(event, city, eid, **fields),
        created_at=utcnow(),
    )
    session.add(row)
    return row


def _program_published(session: Session, rules: domain.CityRules, eid: str):
    rows = {r.id: r for r in session.scalars(select(Program))}
    return _outbox(
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


def pending_events(
    session: Session, limit: int = 500, older_than_s: float = 0.0
) -> list[OutboxEvent]:
    """Outbox events not yet marked published, oldest first.

    ``older_than_s`` leaves the newest to the worker that is publishing them.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    rows = list(
        session.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.published_at.is_(None), OutboxEvent.created_at <= cutoff)
            .order_by(OutboxEvent.id)
            .limit(limit)
        )
    )
    session.rollback()
    return rows


def mark_published(session: Session, ids: list[int]) -> None:
    if not ids:
        return
    with _writing(session):
        try:
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id.in_(ids), OutboxEvent.published_at.is_(None))
                .values(published_at=utcnow())
            )
            session.commit()
        except BaseException:
            session.rollback()
            raise


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
            session.flush()
            # The funding and its announcement commit together; one event per
            # rules file (a restart on the same rules re-announces nothing new).
            eid = event_id("program_published", rules.city, "rules", rules.sha256)
            if (
                session.scalar(
                    select(OutboxEvent.id).where(OutboxEvent.event_id == eid)
                )
                is None
            ):
                _program_published(session, rules, eid)
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
    events: list[OutboxEvent] = field(default_factory=list)


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
    with _writing(session):
        try:
            if decision.decision == domain.APPROVED:
                voucher, event = _issue(
                    session, rules, program, application, face_value_fen, now
                )
                events.append(event)
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
    return ApplicationResult(application, voucher, events)


def _issue(
    session: Session,
    rules: domain.CityRules,
    program: domain.Program,
    application: Application,
    face_value_fen: int,
    now: datetime,
) -> tuple[Voucher, OutboxEvent]:
    # No lock yet: the unique index on active vouchers is what makes the
    # one-active-voucher rule race-free (a concurrent twin fails on insert).
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
    event = _outbox(
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
    # The budget last: a conditional update locks the program row only from
    # here to the commit, so concurrent issues queue for one statement and a
    # commit instead of for the whole transaction.
    funded = session.execute(
        update(Program)
        .where(Program.id == program.id, Program.available_fen >= face_value_fen)
        .values(
            available_fen=Program.available_fen - face_value_fen,
            committed_fen=Program.committed_fen + face_value_fen,
            updated_at=now,
        )
        .returning(Program.id)
    ).first()
    if funded is None:
        available = session.scalar(
            select(Program.available_fen).where(Program.id == program.id)
        )
        if available is None:
            raise NotFound("program_not_found", f"no program {program.id}")
        raise Conflict(
            "budget_exhausted",
            f"program {program.id} has {available} fen available, "
            f"{face_value_fen} fen requested",
            {"available_fen": available},
        )
    return voucher, event


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


def _shift_program(
    session: Session, program_id: str, now: datetime, **deltas_fen: int
) -> None:
    """Move money between a program's budget states: ``committed=-x, redeemed=x``.

    A relative update (the database adds), so no read-modify-write is lost
    between concurrent bookings on the same program.
    """
    values = {
        f"{state}_fen": getattr(Program, f"{state}_fen") + delta
        for state, delta in deltas_fen.items()
    }
    session.execute(
        update(Program).where(Program.id == program_id).values(**values, updated_at=now)
    )


def book_usage_batch(
    session: Session, rules: domain.CityRules, records: Sequence[Mapping[str, Any]]
) -> list[BookingOutcome]:
    """Book many rated records in **one** transaction; outcomes in their order.

    The same guarantees as :func:`book_usage` record by record: each
    (datacenter_id, record_id) changes the ledger at most once, a redelivered
    record gets back the rows booked the first time. Every voucher the batch
    names is locked once, in code order (so concurrent batches cannot
    deadlock), then their programs, in id order; balances are updated once per
    voucher and program, and rows and ledger entries are inserted in bulk.
    """
    if not records:
        return []
    with _writing(session):
        for _attempt in range(3):
            try:
                outcomes = _book_batch(session, rules, records)
                session.commit()
                return outcomes
            except IntegrityError:
                # A competing consumer booked a record of this batch between
                # our check and our insert: nothing was written; look again.
                session.rollback()
            except BaseException:
                session.rollback()
                raise
        # Still colliding: one record at a time, each in its own transaction.
        return [book_usage(session, rules, record) for record in records]


def _lock_rows(session: Session, model, key, values, *, key_share=False) -> dict:
    """``model`` rows whose ``key`` is in ``values``, locked in key order."""
    if not values:
        return {}
    statement = select(model).where(key.in_(sorted(values))).order_by(key)
    return {
        getattr(row, key.key): row
        for row in session.scalars(_locked(session, statement, key_share=key_share))
    }


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
    "SELECT r.* FROM unnest(CAST(:ids AS TEXT[])) AS k(id) CROSS JOIN LATERAL "
    "(SELECT * FROM redemptions WHERE event_id = k.id OFFSET 0) AS r "
    "ORDER BY r.id"
)
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


def _booked(session: Session, event_ids: list[str]) -> list[Redemption]:
    if session.get_bind().dialect.name == "postgresql":
        statement = select(Redemption).from_statement(_BOOKED_SQL)
        return list(session.scalars(statement, {"ids": event_ids}))
    return list(
        session.scalars(
            select(Redemption)
            .where(Redemption.event_id.in_(event_ids))
            .order_by(Redemption.id)
        )
    )


def _corrections(session: Session, record_ids: list[str]):
    """(datacenter_id, corrected record, correction) of the booked corrections
    of ``record_ids`` (in any data centre), in booking order."""
    if session.get_bind().dialect.name == "postgresql":
        return session.execute(_CORRECTIONS_SQL, {"ids": record_ids}).all()
    return session.execute(
        select(Redemption.datacenter_id, Redemption.correction_of, Redemption.record_id)
        .where(Redemption.correction_of.in_(record_ids), Redemption.kind == USAGE)
        .order_by(Redemption.id)
    ).all()


def _rejected(session: Session, dc: str, record_ids: list[str]):
    """(record_id, reason) of those of ``record_ids`` rejected before."""
    if session.get_bind().dialect.name == "postgresql":
        return session.execute(_REJECTED_SQL, {"dc": dc, "ids": record_ids}).all()
    return session.execute(
        select(RejectedUsage.record_id, RejectedUsage.reason).where(
            RejectedUsage.datacenter_id == dc,
            RejectedUsage.record_id.in_(record_ids),
        )
    ).all()


def _by_datacenter(keys: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for datacenter_id, record_id in keys:
        grouped.setdefault(datacenter_id, []).append(record_id)
    return grouped


def _already_done_many(
    session: Session, event_ids: dict[tuple[str, str], str]
) -> tuple[dict[tuple[str, str], BookingOutcome], dict[tuple[str, str], str]]:
    """:func:`_already_done` for many records without ``correction_of`` (their
    keys → the event ids of their bookings), and which of them a booked
    correction already replaced (record → its latest correction)."""
    keys = list(event_ids)
    rows = _booked(session, list(event_ids.values()))
    # A record whose row has a correction_of was booked as a correction (a
    # body that differs from this one) and wrote a reversal too, under its id
    # as the source: rare, so those are read again with every row they wrote.
    again = {(r.datacenter_id, r.source_record_id) for r in rows if r.correction_of}
    for dc, record_ids in _by_datacenter(again).items():
        rows += session.scalars(
            select(Redemption).where(
                Redemption.datacenter_id == dc,
                Redemption.source_record_id.in_(record_ids),
                Redemption.kind == REVERSAL,
            )
        )
    done: dict[tuple[str, str], BookingOutcome] = {}
    for row in sorted(rows, key=lambda r: r.id) if again else rows:
        outcome = done.setdefault(
            (row.datacenter_id, row.source_record_id), BookingOutcome(duplicate=True)
        )
        outcome.redemptions.append(row)
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


def _insert_rows(session: Session, table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts with the same keys) in the session's transaction.

    On PostgreSQL by COPY: one stream instead of one INSERT per row, which
    cost the server (and the hub, waiting on each) several times more. Its
    errors come as SQLAlchemy's, so that a unique violation is an
    ``IntegrityError`` to the callers as with ``insert``.
    """
    if session.get_bind().dialect.name != "postgresql":
        session.execute(insert(table), rows)
        return
    columns = list(rows[0])
    statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
    connection = session.connection().connection.driver_connection
    try:
        with connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc


def _book_batch(
    session: Session, rules: domain.CityRules, records: Sequence[Mapping[str, Any]]
) -> list[BookingOutcome]:
    # Lock first, then look: under READ COMMITTED every query after the lock
    # sees what a competing consumer committed before releasing it.
    vouchers = _lock_rows(
        session,
        Voucher,
        Voucher.code,
        {r["voucher_code"] for r in records if r.get("voucher_code")},
    )
    if any(r.get("correction_of") for r in records):
        # Corrections are rare and depend on order: book one after another,
        # still in this one transaction (autoflush lets each see the others).
        return [_book(session, rules, record) for record in records]
    # Programs FOR NO KEY UPDATE: an issue inserting a voucher of the program
    # (a key-share lock) does not wait for this batch, nor this batch for it.
    programs = _lock_rows(
        session,
        Program,
        Program.id,
        {v.program_id for v in vouchers.values()},
        key_share=True,
    )
    first: dict[tuple[str, str], int] = {}
    for n, record in enumerate(records):
        first.setdefault((record["datacenter_id"], record["record_id"]), n)
    event_ids = {key: _redeemed_event_id(rules.city, *key, USAGE) for key in first}
    done, superseded = _already_done_many(session, event_ids)

    now = utcnow()
    redemptions: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    outcomes: dict[tuple[str, str], BookingOutcome] = dict(done)
    for key, eid in event_ids.items():
        if key in done:
            continue
        record = records[first[key]]
        dc, record_id = key
        code = record.get("voucher_code")
        voucher = vouchers.get(code or "")
        program = rules.program(voucher.program_id) if voucher is not None else None
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
            rejections.append(
                {
                    "datacenter_id": dc,
                    "record_id": record_id,
                    "voucher_code": code[:64] if isinstance(code, str) else None,
                    "reason": problem,
                    "detail": detail[:512],
                    "received_at": now,
                }
            )
            outcomes[key] = BookingOutcome(rejected=problem)
            continue
        budget = programs[voucher.program_id]
        rate_bp = (
            domain.effective_rate_bp(program, attributes)
            if program is not None
            else budget.rate_bp
        )
        subsidy = domain.subsidy_fen(
            record["cost_fen"], rate_bp, voucher.balance_fen, budget.committed_fen
        )
        # The rows are locked: plain read-modify-write is safe here.
        voucher.redeemed_fen += subsidy
        budget.committed_fen -= subsidy
        budget.redeemed_fen += subsidy
        budget.updated_at = now
        row = {
            "datacenter_id": dc,
            "record_id": record_id,
            "kind": USAGE,
            "source_record_id": record_id,
            "correction_of": None,
            "voucher_code": voucher.code,
            "program_id": voucher.program_id,
            "gpu_seconds": record["gpu_seconds"],
            "cost_fen": record["cost_fen"],
            "rate_bp": rate_bp,
            "subsidy_fen": subsidy,
            "event_id": eid,
            "booked_at": now,
        }
        redemptions.append(row)
        reference = f"{USAGE}:{dc}:{record_id}"
        entries.extend(
            {
                "account": account,
                "amount_fen": amount,
                "reference": reference,
                "created_at": now,
            }
            for account, amount in domain.redemption_entries(
                voucher.program_id, voucher.code, subsidy
            )
            if amount
        )
        outcomes[key] = BookingOutcome(redemptions=[SimpleNamespace(**row)])

    session.flush()  # the balances, before the rows that reference them
    if redemptions:
        # A unique violation here (a competing consumer, a conflicting
        # duplicate) rolls the whole batch back: book_usage_batch retries.
        _insert_rows(session, Redemption.__table__, redemptions)
    if rejections:
        _insert_rows(session, RejectedUsage.__table__, rejections)
    if entries:
        _insert_rows(session, LedgerEntry.__table__, entries)

    result = []
    for n, record in enumerate(records):
        key = (record["datacenter_id"], record["record_id"])
        outcome = outcomes[key]
        if first[key] != n:  # the same record twice in one batch
            outcome = BookingOutcome(outcome.redemptions, outcome.rejected, True)
        result.append(outcome)
    return result


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
    if kind == REVERSAL and voucher.status != domain.ACTIVE:
        # The voucher is closed: it holds no commitment any more, so the
        # reversed subsidy is released to the budget, not re-committed.
        _release_reversal(
            session, rules, voucher, -subsidy, datacenter_id, record_id, now
        )
        return row
    voucher.redeemed_fen += subsidy
    _shift_program(
        session, voucher.program_id, now, committed=-subsidy, redeemed=subsidy
    )
    _post(
        session,
        domain.redemption_entries(voucher.program_id, voucher.code, subsidy),
        f"{kind}:{datacenter_id}:{record_id}",
        now,
    )
    return row


def _release_reversal(
    session: Session,
    rules: domain.CityRules,
    voucher: Voucher,
    amount: int,
    datacenter_id: str,
    record_id: str,
    now: datetime,
) -> None:
    voucher.redeemed_fen -= amount
    voucher.released_fen += amount
    _shift_program(
        session,
        voucher.program_id,
        now,
        redeemed=-amount,
        available=amount,
        released=amount,
    )
    _post(
        session,
        domain.release_entries(
            voucher.program_id, voucher.code, amount, from_redeemed=True
        ),
        f"reversal-release:{datacenter_id}:{record_id}",
        now,
    )
    if amount:
        _outbox(
            session,
            rules.city,
            "voucher_released",
            event_id(
                "voucher_released", rules.city, voucher.code, datacenter_id, record_id
            ),
            voucher_code=voucher.code,
            program_id=voucher.program_id,
            released_fen=amount,
            reason=voucher.status,
        )


# --------------------------------------------------------------------------
# Review, expiry, revocation


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
    with _writing(session):
        try:
            application = session.execute(
                _locked(
                    session, select(Application).where(Application.id == application_id)
                )
            ).scalar_one_or_none()
            if application is None:
                raise NotFound(
                    "application_not_found", f"no application {application_id}"
                )
            if application.decision != domain.PENDING_REVIEW:
                raise Conflict(
                    "application_not_pending",
                    f"application {application_id} is {application.decision}",
                    {"decision": application.decision},
                )
            program = rules.program(application.program_id)
            if program is None:
                raise NotFound(
                    "program_not_found",
                    f"program {application.program_id} is no longer in the rules",
                )
            voucher, events = None, []
            if approve:
                voucher, event = _issue(
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
            session.commit()
        except IntegrityError as exc:
            session.rollback()
            raise Conflict(
                "active_voucher_exists",
                "the company already holds an active voucher of the program",
            ) from exc
        except BaseException:
            session.rollback()
            raise
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
    _shift_program(
        session,
        voucher.program_id,
        now,
        committed=-amount,
        available=amount,
        released=amount,
    )
    _post(
        session,
        domain.release_entries(voucher.program_id, voucher.code, amount),
        f"{status}:{voucher.code}",
        now,
    )
    return _outbox(
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
    """Expire up to ``limit`` active vouchers past their date, in one transaction.

    Vouchers another copy of the service is closing are skipped (SKIP LOCKED).
    """
    now = now or utcnow()
    with _writing(session):
        try:
            statement = (
                select(Voucher)
                .where(Voucher.status == domain.ACTIVE, Voucher.expires_at <= now)
                .order_by(Voucher.code)
                .limit(limit)
            )
            if session.get_bind().dialect.name != "sqlite":
                statement = statement.with_for_update(skip_locked=True)
            events = [
                _close(session, rules, v, domain.EXPIRED, "system", "expired", now)
                for v in session.scalars(statement).all()
            ]
            session.commit()
            return events
        except BaseException:
            session.rollback()
            raise


def revoke(
    session: Session, rules: domain.CityRules, code: str, reason: str, actor: str
) -> tuple[Voucher, OutboxEvent]:
    """A city admin revokes an active voucher; its balance is released."""
    with _writing(session):
        try:
            voucher = session.execute(
                _locked(session, select(Voucher).where(Voucher.code == code))
            ).scalar_one_or_none()
            if voucher is None:
                raise NotFound("voucher_not_found", f"no voucher {code}")
            if voucher.status != domain.ACTIVE:
                raise Conflict(
                    "voucher_not_active",
                    f"voucher {code} is {voucher.status}",
                    {"status": voucher.status},
                )
            event = _close(
                session, rules, voucher, domain.REVOKED, actor, reason, utcnow()
            )
            session.commit()
            return voucher, event
        except BaseException:
            session.rollback()
            raise


# --------------------------------------------------------------------------
# Listings and statements


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
    row = session.get(Application, application_id)
    session.rollback()
    if row is None:
        raise NotFound("application_not_found", f"no application {application_id}")
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
    limit, offset = _page(limit, offset)
    voucher = session.get(Voucher, code)
    if voucher is None:
        session.rollback()
        raise NotFound("voucher_not_found", f"no voucher {code}")
    accounts = [
        domain.voucher_account(code, c) for c in ("face", "redeemed", "released")
    ]
    entries, total = _entries(session, accounts, limit, offset)
    session.rollback()
    return voucher, entries, total


PROGRAM_COLUMNS = ("available", "committed", "redeemed", "released")


def program_statement(
    session: Session, program_id: str, limit: int = 1000, offset: int = 0
) -> tuple[Program, list[dict], int]:
    limit, offset = _page(limit, offset)
    program = session.get(Program, program_id)
    if program is None:
        session.rollback()
        raise NotFound("program_not_found", f"no program {program_id}")
    accounts = [domain.program_account(program_id, c) for c in PROGRAM_COLUMNS]
    entries, total = _entries(session, accounts, limit, offset)
    session.rollback()
    return program, entries, total


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

    def book_usage_batch(
        self, records: Sequence[Mapping[str, Any]]
    ) -> list[BookingOutcome]:
        return book_usage_batch(self.session, self.rules, records)

    def get_voucher(self, code: str):
        return get_voucher(self.session, code)

    def program_states(self) -> list[dict[str, Any]]:
        return program_states(self.session, self.rules)

    def check(self) -> list[str]:
        return check_ledger(self.session)

    def review(self, application_id, approve, reason, reviewer) -> ApplicationResult:
        return review(
            self.session, self.rules, application_id, approve, reason, reviewer
        )

    def expire_due(self, now=None) -> list[OutboxEvent]:
        return expire_due(self.session, self.rules, now)

    def revoke(self, code: str, reason: str, actor: str):
        return revoke(self.session, self.rules, code, reason, actor)

    def pending_events(
        self, limit: int = 500, older_than_s: float = 0.0
    ) -> list[OutboxEvent]:
        return pending_events(self.session, limit, older_than_s)

    def mark_published(self, ids: list[int]) -> None:
        mark_published(self.session, ids)

    def list_applications(self, status=None, limit=100, offset=0):
        return list_applications(self.session, status, limit, offset)

    def get_application(self, application_id: str) -> Application:
        return get_application(self.session, application_id)

    def list_vouchers(self, company_id=None, status=None, limit=100, offset=0):
        return list_vouchers(self.session, company_id, status, limit, offset)

    def voucher_statement(self, code: str, limit: int = 1000, offset: int = 0):
        return voucher_statement(self.session, code, limit, offset)

    def program_statement(self, program_id: str, limit: int = 1000, offset: int = 0):
        return program_statement(self.session, program_id, limit, offset)

    def totals(self) -> dict[str, Any]:
        return ledger_totals(self.session, self.rules)
