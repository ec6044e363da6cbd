"""What is booked already: the lookups of a batch, and of a review, after the locks.

A batch asks, for its records, which were booked, refused or held before (and
so are answered as they were), which a booked correction replaced, and what
the records its corrections correct booked; a review asks for the rows of one
record and whether its subsidy stands. On PostgreSQL each lookup of a batch is
an index probe per record, whatever the tables' statistics (see below).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from sqlalchemy import String, case, cast, func, literal, null, select, text
from sqlalchemy.orm import Session

from services.vouchers import domain
from services.vouchers.ledger.redemptions import (
    BOOKING_KINDS,
    REDEMPTION_COLUMNS,
    REVERSAL,
    USAGE,
    BookingOutcome,
    Key,
    RedemptionRow,
)
from services.vouchers.ledger.sql import dialect
from services.vouchers.models import HeldUsage, Redemption, RejectedUsage

# Looked up as plain rows (typed, so that times come back in UTC): loading
# ORM objects only to copy them cost a redelivered batch a quarter more time.
_TABLE = Redemption.__table__
_LOOKED_UP = (_TABLE.c.id, *(_TABLE.c[c] for c in REDEMPTION_COLUMNS))


def _found(session: Session, statement, params=None) -> list[tuple[int, RedemptionRow]]:
    """(id, row) of the redemptions ``statement`` selects (``_LOOKED_UP``)."""
    return [(r[0], RedemptionRow(*r[1:])) for r in session.execute(statement, params)]


def originals(session: Session, corrected: Iterable[Key]) -> dict[Key, RedemptionRow]:
    """The rows whose subsidy stands booked of the ``corrected`` records not
    reversed yet: a usage row, or its booking again on release, unless a
    review held it or clawed it back since."""
    lines: dict[Key, list[tuple[int, RedemptionRow]]] = {}
    for dc, record_ids in _by_datacenter(corrected).items():
        statement = select(*_LOOKED_UP).where(
            _TABLE.c.datacenter_id == dc, _TABLE.c.record_id.in_(record_ids)
        )
        for found in _found(session, statement):
            lines.setdefault((dc, found[1].record_id), []).append(found)
    standing = {}
    for key, found in lines.items():
        rows = [row for _id, row in sorted(found, key=lambda f: f[0])]
        row = standing_row(rows)
        if row is not None:
            standing[key] = row
    return standing


def record_rows(session: Session, key: Key) -> list[RedemptionRow]:
    """Every redemption row of a record, in booking order."""
    statement = (
        select(*_LOOKED_UP)
        .where(_TABLE.c.datacenter_id == key[0], _TABLE.c.record_id == key[1])
        .order_by(_TABLE.c.id)
    )
    return [row for _id, row in _found(session, statement)]


def standing_row(rows: list[RedemptionRow]) -> RedemptionRow | None:
    """Of a record's rows in booking order, the one whose subsidy stands
    booked, unless a correction reversed it (once, by its first correction)."""
    if any(row.kind == REVERSAL for row in rows):
        return None
    n = domain.standing((row.kind for row in rows), BOOKING_KINDS)
    return rows[n] if n is not None else None


def replaced_by_correction(session: Session, key: Key) -> bool:
    """Whether a correction of the record is booked (it replaced the record)."""
    return bool(
        session.scalar(
            select(func.count()).where(
                Redemption.datacenter_id == key[0],
                Redemption.correction_of == key[1],
                Redemption.kind == USAGE,
            )
        )
    )


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
    "SELECT r.record_id, r.reason, r.held, r.hold FROM "
    "unnest(CAST(:ids AS TEXT[])) AS k(id) CROSS JOIN LATERAL "
    "(SELECT record_id, reason, false AS held, NULL AS hold FROM rejected_usage "
    "WHERE datacenter_id = :dc AND record_id = k.id "
    # A record held on arrival (its hold pending review), or a hold that came
    # before its record (clawback.hold_booked: no record, its evidence kept).
    "UNION ALL SELECT record_id, reason, true, "
    "CASE WHEN record IS NULL THEN CAST(evidence AS TEXT) END FROM held_usage "
    f"WHERE datacenter_id = :dc AND record_id = k.id AND status = '{domain.HELD}' "
    "OFFSET 0) AS r"
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
    """(record_id, reason, held, hold) of those of ``record_ids`` rejected
    before, or held (``held``; ``hold``: the evidence, as JSON text, of a
    hold that came before its record)."""
    if dialect(session) == "postgresql":
        return session.execute(_REJECTED_SQL, {"dc": dc, "ids": record_ids}).all()
    rejected = session.execute(
        select(
            RejectedUsage.record_id, RejectedUsage.reason, literal(False), null()
        ).where(
            RejectedUsage.datacenter_id == dc,
            RejectedUsage.record_id.in_(record_ids),
        )
    ).all()
    held = session.execute(
        select(
            HeldUsage.record_id,
            HeldUsage.reason,
            literal(True),
            case((HeldUsage.record.is_(None), cast(HeldUsage.evidence, String))),
        ).where(
            HeldUsage.datacenter_id == dc,
            HeldUsage.record_id.in_(record_ids),
            HeldUsage.status == domain.HELD,
        )
    ).all()
    return rejected + held


def _by_datacenter(keys: Iterable[Key]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for datacenter_id, record_id in keys:
        grouped.setdefault(datacenter_id, []).append(record_id)
    return grouped


def already_done(
    session: Session, event_ids: dict[Key, str], awaiting: dict[Key, dict]
) -> tuple[dict[Key, BookingOutcome], dict[Key, str]]:
    """The outcomes of the records booked, rejected or held before (their
    keys → the event ids of their bookings), and which records a booked
    correction already replaced (record → its latest correction); holds that
    came before their records are put in ``awaiting`` (key → hold)."""
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
        for record_id, reason, held, hold in _rejected(session, dc, record_ids):
            if hold is not None:
                evidence = hold if isinstance(hold, dict) else json.loads(hold)
                awaiting[(dc, record_id)] = {"reason": reason, "evidence": evidence}
            elif held:
                done[(dc, record_id)] = BookingOutcome(held=reason, duplicate=True)
            else:
                done[(dc, record_id)] = BookingOutcome(rejected=reason, duplicate=True)
    return done, superseded
