"""Storing usage: what :func:`services.metering.ingest.process_batch` writes
for the records of a batch, and the SQL helpers metering's writers share.

The records themselves (PostgreSQL: binary COPY into a staging table, then one
``INSERT … SELECT … ON CONFLICT DO NOTHING``, after the batch's advisory
locks, in one round trip; SQLite: one multi-row insert), the stored rows and
corrections they are judged against, the hourly rollups and all-time totals
they move (additive upserts, in key order), and each data centre's
attributes. Every function runs inside the caller's transaction; none
commits. Rows are plain dicts (``ingest.check``'s ``Checked.row``), so this
module knows nothing of messages or events.
"""

from __future__ import annotations

import json
import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.metering.domain import rollups, validation
from services.metering.models import (
    CapacityClaim,
    MeteredDatacenter,
    UsageRecord,
    UsageRollup,
    UsageTotal,
)

_RECORDS = UsageRecord.__table__
_ROLLUPS = UsageRollup.__table__
_TOTALS = UsageTotal.__table__
_BUCKET = ("datacenter_id", "city", "tenant_id", "voucher_code", "gpu_model", "hour")
# What a stored record needs to be announced again or taken out of the rollups.
_ROW_COLUMNS = [
    _RECORDS.c[name]
    for name in (
        *validation.RECORD_FIELDS,
        "record_sha256",
        "city",
        "cost_fen",
        "unit_price_fen_per_gpu_hour",
        "government_run",
        "hub_region",
        "chip_origin",
        "rated_at",
        "hold",
    )
]


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def insert_for(session: Session):
    """The dialect's ``insert`` (both have ``ON CONFLICT``) for ``session``."""
    dialect = session.get_bind().dialect.name
    return {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]


def _lock_statement(rows: Iterable[Mapping[str, Any]]) -> str:
    """Serialise against other writers of the same records or their
    corrections: the statement taking their advisory locks (PostgreSQL)."""
    keys = set()
    lock_key = rollups.lock_key
    for row in rows:
        keys.add(lock_key(row["datacenter_id"], row["record_id"]))
        correction_of = row["correction_of"]
        if correction_of is not None:
            keys.add(lock_key(row["datacenter_id"], correction_of))
    # In one order everywhere, so two batches never wait for each other in a
    # ring. The keys are ints: written into the statement as an array literal.
    return (
        "SELECT count(pg_advisory_xact_lock(k)) FROM "
        "(SELECT unnest(CAST('{" + ",".join(map(str, sorted(keys))) + "}'"
        " AS bigint[])) AS k ORDER BY 1) AS ordered"
    )


Correctors = dict[rollups.RecordKey, set[rollups.RecordKey]]


def insert_records(
    session: Session, rows: list[dict[str, Any]]
) -> tuple[set[rollups.RecordKey], Correctors | None]:
    """Insert what is new (``rows``: one per record key); returns the keys
    actually inserted (RETURNING) and, on PostgreSQL, the records stored
    *before* this statement that name one of them in ``correction_of``
    (``{corrected: {correctors}}``), found by the same statement. On SQLite
    that second part is None (asked separately).

    PostgreSQL: the rows' advisory locks (:func:`_lock_statement`) are taken
    just before the insert, in the same round trip; SQLite has one writer at
    a time anyway."""
    if not rows:
        return set(), {}
    if session.get_bind().dialect.name == "postgresql":
        inserted: set[rollups.RecordKey] = set()
        correctors: Correctors = {}
        values = map(_RECORD_VALUES, rows)
        lock = _lock_statement(rows)
        for dc, record_id, corrector in _copy_in(session, _RECORDS, values, lock):
            inserted.add((dc, record_id))
            if corrector is not None:
                correctors.setdefault((dc, record_id), set()).add((dc, corrector))
        return inserted, correctors
    # One statement, many parameter sets: SQLAlchemy's "insertmanyvalues" sends
    # them as multi-row VALUES and keeps the compiled statement cached.
    statement = (
        insert_for(session)(_RECORDS)
        .on_conflict_do_nothing(index_elements=["datacenter_id", "record_id"])
        .returning(_RECORDS.c.datacenter_id, _RECORDS.c.record_id)
    )
    rows = sorted(rows, key=lambda row: (row["datacenter_id"], row["record_id"]))
    return {tuple(key) for key in session.execute(statement, rows)}, None


# PostgreSQL: COPY a batch into a temporary table (created once per
# connection, emptied at each commit), then one INSERT … SELECT … ON CONFLICT
# moves it over: two round trips for any batch size, and no multi-kilobyte
# statement for the driver to parse (where the time went).
#
# The records' INSERT also answers "which stored records correct the ones
# just inserted?" in the same round trip: the outer SELECT of a statement with
# a data-modifying WITH sees the table as it was before the statement (rows of
# this batch are not in it; the caller knows those), and it runs after the
# batch's advisory locks are held, so a concurrent corrector has committed
# (and is seen) or waits for this transaction (and sees these records). The
# locks are taken by the statement sent just before it, in the same simple
# query (one round trip): under READ COMMITTED each statement of it takes its
# own snapshot, so the insert's is taken once the locks are held.
_SUMS = ("records", "gpu_seconds", "cost_fen")  # what rollups and totals add up


def _add_sums(table: str) -> str:
    """``ON CONFLICT … DO UPDATE SET`` adding the incoming sums to ``table``'s."""
    return ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in _SUMS)


_RECORD_COLUMNS = [name for name in _RECORDS.c.keys() if name != "id"]
CLAIM_COLUMNS = (
    "datacenter_id",
    "gpu_model",
    "hour",
    "started_at",
    "record_id",
    "gpu_seconds",
)
_RECORD_VALUES = operator.itemgetter(*_RECORD_COLUMNS)  # a row's, in COPY order
_COPY_TARGETS = {
    "usage_records": (
        _RECORD_COLUMNS,
        "WITH inserted AS ("
        " INSERT INTO usage_records ({names})"
        " SELECT {names} FROM incoming_usage_records"
        " ORDER BY datacenter_id, record_id"
        " ON CONFLICT (datacenter_id, record_id) DO NOTHING"
        " RETURNING datacenter_id, record_id)"
        " SELECT inserted.datacenter_id, inserted.record_id, stored.record_id"
        " FROM inserted LEFT JOIN usage_records AS stored"
        " ON stored.datacenter_id = inserted.datacenter_id"
        " AND stored.correction_of = inserted.record_id"
        # what lets the planner use the partial index of corrections
        " AND stored.correction_of IS NOT NULL",
    ),
    # The rollups and, in the same statement (a data-modifying WITH runs to
    # completion whether or not it is read), each data centre's all-time
    # totals, on this connection's stripe.
    "usage_rollups_hourly": (
        [*_BUCKET, *_SUMS],
        "WITH rolled AS ("
        " INSERT INTO usage_rollups_hourly ({names})"
        " SELECT {names} FROM incoming_usage_rollups_hourly"
        " ORDER BY " + ", ".join(_BUCKET) + " ON CONFLICT (" + ", ".join(_BUCKET) + ")"
        " DO UPDATE SET " + _add_sums("usage_rollups_hourly") + ")"
        " INSERT INTO usage_totals"
        " (datacenter_id, stripe, records, gpu_seconds, cost_fen)"
        f" SELECT datacenter_id, pg_backend_pid() % {UsageTotal.STRIPES},"
        " sum(records), sum(gpu_seconds), sum(cost_fen)"
        " FROM incoming_usage_rollups_hourly"
        " GROUP BY datacenter_id ORDER BY datacenter_id"
        " ON CONFLICT (datacenter_id, stripe) DO UPDATE SET "
        + _add_sums("usage_totals"),
    ),
    # The holds' capacity claims of a batch's records and, in the same
    # statement, the buckets they add to, in key order (their row locks),
    # each bucket's new total returned (``services.metering.holds``).
    "capacity_claims": (
        [*CLAIM_COLUMNS],
        "WITH claimed AS ("
        " INSERT INTO capacity_claims ({names})"
        " SELECT {names} FROM incoming_capacity_claims)"
        " INSERT INTO capacity_buckets (datacenter_id, gpu_model, hour, gpu_seconds)"
        " SELECT datacenter_id, gpu_model, hour, sum(gpu_seconds)"
        " FROM incoming_capacity_claims GROUP BY datacenter_id, gpu_model, hour"
        " ORDER BY datacenter_id, gpu_model, hour"
        " ON CONFLICT (datacenter_id, gpu_model, hour) DO UPDATE SET"
        " gpu_seconds = capacity_buckets.gpu_seconds + excluded.gpu_seconds"
        " RETURNING datacenter_id, gpu_model, hour, gpu_seconds",
    ),
}
# Keys of the SQLAlchemy connection's ``info`` (which lives as long as the
# database connection): the staging tables it has, the data-centre attributes
# it has written.
_STAGING_READY = "metering_staging_ready"  # {staging table: its column types}
_DATACENTERS_WRITTEN = "metering_datacenters_written"


def forget_written(info: dict) -> None:
    """A failed transaction: what this connection (its ``info``) believed done
    (a temporary table created, a data centre's attributes written) may have
    been rolled back with it."""
    info.pop(_STAGING_READY, None)
    info.pop(_DATACENTERS_WRITTEN, None)


def _copy_in(
    session: Session,
    table,
    rows: Iterable[Sequence[Any]],
    before: str | None = None,
) -> list[tuple]:
    """COPY ``rows`` (each its values in ``_COPY_TARGETS``' column order) to
    the table's staging table, then move them over; returns what the move
    returns. ``before``: a statement to run just before the move, sent with
    it (one round trip; each still sees what committed before it began)."""
    columns, move = _COPY_TARGETS[table.name]
    names = ", ".join(columns)
    staging = f"incoming_{table.name}"
    connection = session.connection()
    ready = connection.info.setdefault(_STAGING_READY, {})
    driver = connection.connection.driver_connection
    with driver.cursor() as cursor:
        types = ready.get(staging)
        if types is None:
            cursor.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS "
                f"SELECT {names} FROM {table.name} WITH NO DATA"
            )
            cursor.execute(
                "SELECT attname, atttypid FROM pg_attribute"
                " WHERE attrelid = CAST(%s AS regclass) AND attnum > 0",
                (staging,),
            )
            oids = dict(cursor.fetchall())
            types = ready[staging] = [oids[name] for name in columns]
        # Binary, each column's type given: psycopg then neither looks a
        # dumper up per value nor escapes text (a fifth of the text format's
        # cost per row, measured), and PostgreSQL parses nothing.
        with cursor.copy(
            f"COPY {staging} ({names}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(types)
            write_row = copy.write_row
            for values in rows:
                write_row(values)
        if before is None:
            cursor.execute(move.format(names=names))
        else:
            # Two statements in one simple query (never prepared: its text
            # changes with ``before``); the move's result is the second.
            cursor.execute(before + "; " + move.format(names=names), prepare=False)
            if not cursor.nextset():  # pragma: no cover - PostgreSQL answers both
                raise RuntimeError("no result from the move after its lock")
        return cursor.fetchall() if cursor.description else []


def copy_claims(session: Session, claims: list[tuple]) -> list[tuple]:
    """PostgreSQL: store ``claims`` (``CLAIM_COLUMNS`` tuples) and add them
    to their buckets, in one COPY and one statement; returns each bucket's
    ``(datacenter_id, gpu_model, hour, total)`` after it."""
    return _copy_in(session, CapacityClaim.__table__, claims)


def _by_datacenter(
    keys: Iterable[rollups.RecordKey], size: int = 500
) -> Iterable[tuple[str, list[str]]]:
    """``(datacenter_id, record ids)`` in chunks of at most ``size`` ids.

    Lookups ask ``datacenter_id = ? AND … IN (…)``: both databases then seek
    the index once per id. A row value ``(datacenter_id, …) IN (VALUES …)``
    made SQLite scan the whole index (``EXPLAIN QUERY PLAN``: ``SCAN``), a
    cost that grew with every record ever stored."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for datacenter_id, record_id in keys:
        grouped[datacenter_id].append(record_id)
    for datacenter_id, ids in grouped.items():
        for start in range(0, len(ids), size):
            yield datacenter_id, ids[start : start + size]


def stored_rows(
    session: Session, keys: Iterable[rollups.RecordKey]
) -> dict[rollups.RecordKey, dict[str, Any]]:
    found: dict[rollups.RecordKey, dict[str, Any]] = {}
    for datacenter_id, ids in _by_datacenter(keys):
        rows = session.execute(
            select(*_ROW_COLUMNS).where(
                _RECORDS.c.datacenter_id == datacenter_id,
                _RECORDS.c.record_id.in_(ids),
            )
        )
        for row in rows.mappings():
            row = dict(row)
            if row["gpu_uuids"] is not None:  # stored as a JSON array
                row["gpu_uuids"] = json.loads(row["gpu_uuids"])
            found[(row["datacenter_id"], row["record_id"])] = row
    return found


def _corrections_of(
    session: Session, keys: Iterable[rollups.RecordKey]
) -> list[tuple[rollups.RecordKey, rollups.RecordKey]]:
    """Every stored ``(corrector, corrected)`` whose corrected record is in ``keys``."""
    pairs = []
    for datacenter_id, ids in _by_datacenter(keys):
        rows = session.execute(
            select(_RECORDS.c.record_id, _RECORDS.c.correction_of).where(
                _RECORDS.c.datacenter_id == datacenter_id,
                # IS NOT NULL: what lets the partial index of corrections serve
                _RECORDS.c.correction_of.is_not(None),
                _RECORDS.c.correction_of.in_(ids),
            )
        )
        pairs.extend(
            ((datacenter_id, record), (datacenter_id, corrected))
            for record, corrected in rows
        )
    return pairs


def held_corrections(
    session: Session,
    rows: Sequence[Mapping[str, Any]],
    targets: Iterable[rollups.RecordKey],
) -> dict[rollups.RecordKey, set[str]]:
    """The record ids of the stored corrections of each of ``targets``, read
    once ``rows``' advisory locks are held (PostgreSQL), so a concurrent
    correction of the same record has committed (and is seen: under READ
    COMMITTED this statement's snapshot is taken after the lock) or waits for
    this transaction (and then sees its corrections). The insert takes the
    same locks again (a transaction's advisory locks stack). Asked only for a
    batch holding corrections: one round trip more for it."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(_lock_statement(rows)))
    held: dict[rollups.RecordKey, set[str]] = {}
    for (_dc, corrector), corrected in _corrections_of(session, set(targets)):
        held.setdefault(corrected, set()).add(corrector)
    return held


def update_rollups(
    session: Session,
    inserted: dict[rollups.RecordKey, dict[str, Any]],
    stored_correctors: Correctors | None = None,
) -> tuple[dict[rollups.RecordKey, int], dict[rollups.RecordKey, dict[str, Any]]]:
    """Move the rollups by what the newly stored records change (domain rule).

    ``stored_correctors``: the records stored before this transaction that
    correct one of ``inserted`` (from the insert itself), or None to ask.
    Returns the changes (record key → +1 starts counting, −1 stops) and the
    rows they are of: what the holds move by (``services.metering.holds``).
    """
    if not inserted:
        return {}, {}
    targets = {
        (dc, row["correction_of"])
        for (dc, _record_id), row in inserted.items()
        if row["correction_of"] is not None
    } - set(inserted)
    stored_targets = stored_rows(session, targets)
    if stored_correctors is None:
        corrections = _corrections_of(session, set(inserted) | set(stored_targets))
    else:
        # Correctors among the inserted records are known here; those of a
        # stored target (only when the batch holds corrections) are asked for.
        corrections = [
            ((dc, row["record_id"]), (dc, row["correction_of"]))
            for (dc, _record_id), row in inserted.items()
            if row["correction_of"] is not None
        ]
        corrections += [
            (corrector, corrected)
            for corrected, by in stored_correctors.items()
            for corrector in by
        ]
        corrections += _corrections_of(session, set(stored_targets))
    changes = rollups.effectiveness_changes(
        set(inserted), set(stored_targets), corrections
    )
    rows = {**stored_targets, **inserted}
    buckets: dict[rollups.RollupKey, list[int]] = defaultdict(lambda: [0, 0, 0])
    for key, sign in changes.items():
        for bucket, records, gpu_seconds, cost in rollups.rollup_contribution(
            rows[key], sign
        ):
            total = buckets[bucket]
            total[0] += records
            total[1] += gpu_seconds
            total[2] += cost
    _upsert_rollups(session, buckets)
    return changes, rows


def _upsert_rollups(
    session: Session, buckets: Mapping[rollups.RollupKey, list[int]]
) -> None:
    """Add to each hourly bucket atomically (no read-modify-write), in key order
    so that two writers never deadlock on the same buckets."""
    if not buckets:
        return
    ordered = sorted(buckets.items())
    if session.get_bind().dialect.name == "postgresql":
        # In the staging table's column order: _BUCKET, then the three sums.
        _copy_in(session, _ROLLUPS, [(*bucket, *sums) for bucket, sums in ordered])
        return
    _add_rows(session, _ROLLUPS, _BUCKET, ordered)
    # Each data centre's all-time totals, as PostgreSQL's statement keeps them
    # (SQLite has one writer at a time: one stripe).
    totals: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    for bucket, sums in ordered:
        total = totals[(bucket[0], 0)]
        for n, value in enumerate(sums):
            total[n] += value
    _add_rows(session, _TOTALS, ("datacenter_id", "stripe"), sorted(totals.items()))


def _add_rows(
    session: Session, table, key: Sequence[str], rows: Iterable[tuple[tuple, list]]
) -> None:
    """SQLite: add each row's ``_SUMS`` to ``table``'s row of the same ``key``
    (inserted if new), in one statement."""
    values = [
        {**dict(zip(key, keys, strict=True)), **dict(zip(_SUMS, sums, strict=True))}
        for keys, sums in rows
    ]
    statement = insert_for(session)(table)
    statement = statement.on_conflict_do_update(
        index_elements=list(key),
        set_={name: table.c[name] + statement.excluded[name] for name in _SUMS},
    )
    # RETURNING makes SQLAlchemy send the rows as multi-row VALUES
    # ("insertmanyvalues"), not one statement per row.
    session.execute(statement.returning(table.c[key[0]]), values).all()


def remember_datacenters(
    session: Session, rows: Iterable[Mapping[str, Any]], now: datetime
) -> None:
    """Each data centre's hub region and government_run, as its records were
    rated (what the reports group by)."""
    attributes = {
        row["datacenter_id"]: (row["hub_region"], row["government_run"]) for row in rows
    }
    # Written once per connection while they stay the same (cleared when a
    # transaction fails, as the write may have been rolled back).
    written = session.connection().info.setdefault(_DATACENTERS_WRITTEN, {})
    if all(written.get(dc) == value for dc, value in attributes.items()):
        return
    written.update(attributes)
    insert = insert_for(session)
    statement = insert(MeteredDatacenter.__table__).values(
        [
            {
                "datacenter_id": dc,
                "hub_region": region,
                "government_run": government_run,
                "updated_at": now,
            }
            for dc, (region, government_run) in sorted(attributes.items())
        ]
    )
    statement = statement.on_conflict_do_update(
        index_elements=["datacenter_id"],
        set_={
            "hub_region": statement.excluded.hub_region,
            "government_run": statement.excluded.government_run,
            "updated_at": statement.excluded.updated_at,
        },
    )
    session.execute(statement)
