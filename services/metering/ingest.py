"""The use cases behind metering's consumer: a batch of messages in, its effects
stored in one transaction.

:func:`check` runs every rule of ``domain`` on one message (the registry
through the cache); :func:`process_batch` stores what a batch of messages
changes — new usage records (``INSERT … ON CONFLICT DO NOTHING RETURNING``),
their hourly rollups, capacity reports, and the dead letters of the refused
ones — in **one** transaction, and returns the federation events to publish
*after* the commit. A message that breaks a rule becomes a dead letter in that
same transaction. Anything else (the database or the registry down) raises, so
the caller requeues the whole batch and nothing is half-applied.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.common import contracts, signing
from services.common.amqp import RawMessage, federation_key
from services.common.units import format_ts, rate_cost_fen, utcnow
from services.metering.domain import encoding, rating, rollups, validation
from services.metering.domain.validation import Reason, Refused
from services.metering.models import (
    CapacityReport,
    DeadLetter,
    DeliveryAttempt,
    MeteredDatacenter,
    UsageRecord,
    UsageRollup,
    UsageTotal,
)
from services.metering.registry import CachedRegistry

RECORD_FIELDS = validation.RECORD_FIELDS
_RECORDS = UsageRecord.__table__
_ROLLUPS = UsageRollup.__table__
_TOTALS = UsageTotal.__table__
_CAPACITY = CapacityReport.__table__
_BUCKET = ("datacenter_id", "city", "tenant_id", "voucher_code", "gpu_model", "hour")
# What a stored record needs to be announced again or taken out of the rollups.
_ROW_COLUMNS = [
    _RECORDS.c[name]
    for name in (
        *RECORD_FIELDS,
        "record_sha256",
        "city",
        "cost_fen",
        "unit_price_fen_per_gpu_hour",
        "government_run",
        "hub_region",
        "chip_origin",
        "rated_at",
    )
]


class Outgoing(NamedTuple):
    """A federation event to publish once the transaction has committed.

    A named tuple: one is made per rated record, at a third of the cost of a
    frozen dataclass."""

    routing_key: str
    event_id: str
    body: bytes  # the JSON to publish, made once (encoding.usage_rated_bytes)

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass(slots=True)
class Checked:
    """A message that passed every rule that does not need the database."""

    index: int
    kind: str
    datacenter_id: str
    loaded: dict[str, Any]
    digest: str
    row: dict[str, Any] | None = None  # usage: the row to insert (``loaded`` too)
    wire: bytes | None = None  # usage: its canonical JSON (encoding.record_json)
    key: rollups.RecordKey | None = None  # usage: (datacenter_id, record_id)


@dataclass
class BatchOutcome:
    outgoing: list[Outgoing] = field(default_factory=list)
    # (index in the batch, why) of every message refused (stored as a dead letter).
    refused: list[tuple[int, Refused]] = field(default_factory=list)
    inserted: int = 0
    duplicates: int = 0


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


# -- the rules ------------------------------------------------------------------


def _kept(answers: dict, key: str, ask: Callable[[str], Any]) -> Any:
    """``answers[key]``, else ``ask(key)``, kept only when it is an answer
    (None, "not known", is asked again next time)."""
    found = answers.get(key)
    if found is None:
        found = ask(key)
        if found is not None:
            answers[key] = found
    return found


class Lookups:
    """What one batch asks the registry, each asked once (a batch comes
    mostly from one data centre, its few GPU models and vouchers).

    The same three questions as :class:`CachedRegistry`, answered as it
    would be: only answers that let a record through are kept, so an unknown
    data centre, key id or voucher prefix is asked again every time (and the
    registry refetches it, as ever). A batch lasts well under the registry's
    TTL, so keeping an answer for one batch changes no decision.
    """

    __slots__ = ("registry", "_datacenters", "_keys", "_cities", "_codes", "_terms")

    def __init__(self, registry: CachedRegistry):
        self.registry = registry
        self._datacenters: dict[str, dict] = {}
        self._keys: dict[str, dict[str, str]] = {}
        self._cities: dict[str, str] = {}
        # voucher code as sent → (normalised, its city)
        self._codes: dict[str, tuple[str, str]] = {}
        self._terms: dict[tuple[str, str], rating.PriceTerms] = {}

    def datacenter(self, datacenter_id: str) -> dict | None:
        return _kept(self._datacenters, datacenter_id, self.registry.datacenter)

    def signing_keys(self, datacenter_id: str, key_id: str | None) -> dict[str, str]:
        keys = self._keys.get(datacenter_id)
        if keys is None or not key_id or key_id not in keys:
            keys = self.registry.signing_keys(datacenter_id, key_id)
            self._keys[datacenter_id] = keys
        return keys

    def city_of_prefix(self, prefix: str) -> str | None:
        return _kept(self._cities, prefix, self.registry.city_of_prefix)

    def voucher(self, voucher_code: str) -> tuple[str, str]:
        """``(normalised code, issuing city)``, or :class:`Refused`."""
        known = self._codes.get(voucher_code)
        if known is None:
            code = validation.normalise_voucher_code(voucher_code)
            prefix = validation.voucher_prefix(code)
            city = self.city_of_prefix(prefix)
            if city is None:
                raise validation.unknown_prefix(prefix)
            known = self._codes[voucher_code] = (code, city)
        return known

    def price_terms(
        self, datacenter_id: str, datacenter: dict, gpu_model: str
    ) -> rating.PriceTerms:
        """``rating.price_terms`` of ``datacenter`` (this batch's for its id)."""
        terms = self._terms.get((datacenter_id, gpu_model))
        if terms is None:
            terms = rating.price_terms(datacenter, gpu_model)
            self._terms[(datacenter_id, gpu_model)] = terms
        return terms


def _verified_body(
    registry: CachedRegistry | Lookups, message: RawMessage, datacenter_id: str
) -> tuple[dict, dict]:
    """Envelope, data centre and signature checks; returns (datacenter, JSON)."""
    validation.check_envelope(message.body, message.content_type)
    datacenter = registry.datacenter(datacenter_id) if datacenter_id else None
    if datacenter is None:
        raise Refused(
            Reason.UNKNOWN_DATACENTER, f"{datacenter_id[:64]!r} is not registered"
        )
    key_id = validation.header_text(message.headers, signing.KEY_ID_HEADER)
    keys = registry.signing_keys(datacenter_id, key_id)
    validation.check_signature(message.body, message.headers, keys)
    return datacenter, validation.parse_body(message.body)


def check(
    registry: CachedRegistry | Lookups,
    message: RawMessage,
    index: int,
    rated_at: datetime,
) -> Checked:
    """Every rule but dedup; raises :class:`Refused` with the first one broken.

    ``registry``: a batch's :class:`Lookups` (else asked through new ones).
    """
    lookups = registry if type(registry) is Lookups else Lookups(registry)
    datacenter_id, kind = validation.split_routing_key(message.routing_key)
    if kind != validation.USAGE and kind != validation.CAPACITY:
        raise Refused(
            Reason.SCHEMA, f"routing key {message.routing_key[:255]!r} is not metered"
        )
    datacenter, data = _verified_body(lookups, message, datacenter_id)
    if kind == validation.CAPACITY:
        report = validation.load_capacity(data, datacenter_id)
        digest = encoding.canonical_sha256(report, contracts.CapacityReportSchema)
        return Checked(index, kind, datacenter_id, report, digest)

    record = validation.load_usage(data, datacenter_id)
    # rating: its data-centre part asked once a batch
    price, government_run, hub_region, chip_origin = lookups.price_terms(
        datacenter_id, datacenter, record["gpu_model"]
    )
    cost_fen = rate_cost_fen(record["gpu_seconds"], price)
    city = None
    if record["voucher_code"] is not None:
        record["voucher_code"], city = lookups.voucher(record["voucher_code"])
    wire = encoding.record_json(record)  # once: for the digest and the event
    digest = hashlib.sha256(wire).hexdigest()
    # The row to insert is the record itself, with what rating adds (a loaded
    # record has exactly RECORD_FIELDS; nothing reads it as a record again).
    row = record
    row["record_sha256"] = digest
    row["city"] = city
    row["cost_fen"] = cost_fen
    row["unit_price_fen_per_gpu_hour"] = price
    row["government_run"] = government_run
    row["hub_region"] = hub_region
    row["chip_origin"] = chip_origin
    row["rated_at"] = rated_at
    return Checked(
        index,
        kind,
        datacenter_id,
        record,
        digest,
        row,
        wire,
        (datacenter_id, record["record_id"]),
    )


# -- the batch ------------------------------------------------------------------


def process_batch(
    session: Session,
    registry: CachedRegistry,
    messages: Sequence[RawMessage],
    *,
    store_refused: bool = True,
) -> BatchOutcome:
    """Check, store and roll up ``messages`` in one transaction (committed here).

    With ``store_refused=False`` (a replay) refused messages are reported in
    ``outcome.refused`` but not stored again.
    """
    rated_at = utcnow().replace(microsecond=0)
    outcome = BatchOutcome()
    usage: list[Checked] = []
    capacity: list[Checked] = []
    refusals: list[tuple[int, Refused]] = []
    lookups = Lookups(registry)
    for index, message in enumerate(messages):
        try:
            checked = check(lookups, message, index, rated_at)
        except Refused as refused:
            refusals.append((index, refused))
            continue
        (usage if checked.kind == validation.USAGE else capacity).append(checked)

    info = session.connection().info  # lives as long as the database connection
    try:
        refusals += _store_usage(session, usage, outcome)
        refusals += _store_capacity(session, capacity)
        _remember_datacenters(session, usage, rated_at)
        refusals.sort(key=lambda item: item[0])
        if store_refused:
            for index, refused in refusals:
                session.add(dead_letter_row(messages[index], refused))
        session.commit()
    except BaseException:
        session.rollback()
        # What this connection believed done (a temporary table created, a
        # data centre's attributes written) may have been rolled back with it.
        info.pop(_STAGING_READY, None)
        info.pop(_DATACENTERS_WRITTEN, None)
        raise
    outcome.refused = refusals
    return outcome


def process(
    session: Session, registry: CachedRegistry, message: RawMessage
) -> list[Outgoing]:
    """One message: its events, or :class:`Refused` (nothing stored then)."""
    rated_at = utcnow().replace(microsecond=0)
    check(registry, message, 0, rated_at)  # raises before anything is stored
    outcome = process_batch(session, registry, [message], store_refused=False)
    if outcome.refused:
        # Only dedup can refuse here (conflicting_duplicate).
        raise outcome.refused[0][1]
    return outcome.outgoing


def _store_usage(
    session: Session, usage: list[Checked], outcome: BatchOutcome
) -> list[tuple[int, Refused]]:
    if not usage:
        return []
    refusals: list[tuple[int, Refused]] = []
    # The first copy of a (datacenter_id, record_id) in the batch is the one
    # inserted; later copies are judged against what is then stored.
    first: dict[rollups.RecordKey, Checked] = {}
    repeats: list[Checked] = []
    for checked in usage:
        if checked.key in first:
            repeats.append(checked)
        else:
            first[checked.key] = checked

    # Taken in the round trip that inserts them (_insert_records); SQLite
    # has one writer at a time anyway.
    lock = None
    if session.get_bind().dialect.name == "postgresql":
        lock = _lock_statement(first.values())
    inserted_keys, correctors = _insert_records(
        session, [c.row for c in first.values()], lock
    )
    outcome.inserted = len(inserted_keys)

    stored_before = [key for key in first if key not in inserted_keys]
    stored_rows = _stored_rows(session, stored_before)
    for checked in [*(first[key] for key in stored_before), *repeats]:
        key = checked.key
        existing = first[key].row if key in inserted_keys else stored_rows.get(key)
        if existing is None:  # pragma: no cover - the insert saw it, so it is there
            raise RuntimeError(f"usage record {key} neither inserted nor found")
        if existing["record_sha256"] != checked.digest:
            refusals.append(
                (
                    checked.index,
                    Refused(
                        Reason.CONFLICTING_DUPLICATE,
                        f"record {key[1]!r} was stored "
                        f"{format_ts(as_utc(existing['rated_at']))} "
                        "with a different body",
                    ),
                )
            )
            continue
        outcome.duplicates += 1
        # The same fact again: its event goes out again, with the same id.
        outcome.outgoing.extend(events_of(existing))
    _update_rollups(session, {key: first[key].row for key in inserted_keys}, correctors)
    outgoing = outcome.outgoing
    for key in inserted_keys:
        checked = first[key]
        if checked.row["city"] is not None:  # events_of, the wire at hand
            outgoing.append(_usage_rated(checked.row, checked.wire))
    return refusals


def _lock_statement(checked: Iterable[Checked]) -> str:
    """Serialise against other writers of the same records or their
    corrections: the statement taking their advisory locks (PostgreSQL)."""
    keys = set()
    lock_key = rollups.lock_key
    for item in checked:
        keys.add(lock_key(item.datacenter_id, item.key[1]))
        correction_of = item.loaded["correction_of"]
        if correction_of is not None:
            keys.add(lock_key(item.datacenter_id, correction_of))
    # In one order everywhere, so two batches never wait for each other in a
    # ring. The keys are ints: written into the statement as an array literal.
    return (
        "SELECT count(pg_advisory_xact_lock(k)) FROM "
        "(SELECT unnest(CAST('{" + ",".join(map(str, sorted(keys))) + "}'"
        " AS bigint[])) AS k ORDER BY 1) AS ordered"
    )


def _insert(session: Session):
    dialect = session.get_bind().dialect.name
    return {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]


Correctors = dict[rollups.RecordKey, set[rollups.RecordKey]]


def _insert_records(
    session: Session, rows: list[dict[str, Any]], lock: str | None = None
) -> tuple[set[rollups.RecordKey], Correctors | None]:
    """Insert what is new; returns the keys actually inserted (RETURNING) and,
    on PostgreSQL, the records stored *before* this statement that name one
    of them in ``correction_of`` (``{corrected: {correctors}}``), found by the
    same statement. On SQLite that second part is None (asked separately).

    ``lock`` (PostgreSQL): a statement to run just before the insert, in the
    same round trip (:func:`_lock_statement`)."""
    if not rows:
        return set(), {}
    if session.get_bind().dialect.name == "postgresql":
        inserted: set[rollups.RecordKey] = set()
        correctors: Correctors = {}
        values = map(_RECORD_VALUES, rows)
        for dc, record_id, corrector in _copy_in(session, _RECORDS, values, lock):
            inserted.add((dc, record_id))
            if corrector is not None:
                correctors.setdefault((dc, record_id), set()).add((dc, corrector))
        return inserted, correctors
    # One statement, many parameter sets: SQLAlchemy's "insertmanyvalues" sends
    # them as multi-row VALUES and keeps the compiled statement cached.
    statement = (
        _insert(session)(_RECORDS)
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
}
# Keys of the SQLAlchemy connection's ``info`` (which lives as long as the
# database connection): the staging tables it has, the data-centre attributes
# it has written.
_STAGING_READY = "metering_staging_ready"  # {staging table: its column types}
_DATACENTERS_WRITTEN = "metering_datacenters_written"


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


def _stored_rows(
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
            found[(row["datacenter_id"], row["record_id"])] = dict(row)
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


def _update_rollups(
    session: Session,
    inserted: dict[rollups.RecordKey, dict[str, Any]],
    stored_correctors: Correctors | None = None,
) -> None:
    """Move the rollups by what the newly stored records change (domain rule).

    ``stored_correctors``: the records stored before this transaction that
    correct one of ``inserted`` (from the insert itself), or None to ask.
    """
    if not inserted:
        return
    targets = {
        (dc, row["correction_of"])
        for (dc, _record_id), row in inserted.items()
        if row["correction_of"] is not None
    } - set(inserted)
    stored_targets = _stored_rows(session, targets)
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
    statement = _insert(session)(table)
    statement = statement.on_conflict_do_update(
        index_elements=list(key),
        set_={name: table.c[name] + statement.excluded[name] for name in _SUMS},
    )
    # RETURNING makes SQLAlchemy send the rows as multi-row VALUES
    # ("insertmanyvalues"), not one statement per row.
    session.execute(statement.returning(table.c[key[0]]), values).all()


def _remember_datacenters(
    session: Session, usage: list[Checked], now: datetime
) -> None:
    attributes = {
        item.datacenter_id: (item.row["hub_region"], item.row["government_run"])
        for item in usage
    }
    # Written once per connection while they stay the same (cleared when a
    # transaction fails, as the write may have been rolled back).
    written = session.connection().info.setdefault(_DATACENTERS_WRITTEN, {})
    if all(written.get(dc) == value for dc, value in attributes.items()):
        return
    written.update(attributes)
    insert = _insert(session)
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


def events_of(row: Mapping[str, Any], wire: bytes | None = None) -> list[Outgoing]:
    """The ``<city>.usage_rated`` of a stored record (none without a voucher);
    ``wire``: its :func:`encoding.record_json`, when known."""
    if row["city"] is None:
        return []
    return [_usage_rated(row, encoding.record_json(row) if wire is None else wire)]


def _usage_rated(row: Mapping[str, Any], wire: bytes) -> Outgoing:
    """The event of a stored record that has a city (``events_of``)."""
    event_id = encoding.usage_rated_event_id(row["datacenter_id"], row["record_id"])
    return Outgoing(
        _usage_rated_key(row["city"]),
        event_id,
        encoding.usage_rated_bytes(
            event_id,
            row["city"],
            row["rated_at"],
            wire,
            row["cost_fen"],
            row["unit_price_fen_per_gpu_hour"],
            row["government_run"],
            row["hub_region"],
            row["chip_origin"],
        ),
    )


@functools.lru_cache(maxsize=1024)
def _usage_rated_key(city: str) -> str:
    return federation_key(city, "usage_rated")


# -- capacity ------------------------------------------------------------------


def _store_capacity(
    session: Session, capacity: list[Checked]
) -> list[tuple[int, Refused]]:
    if not capacity:
        return []
    now = utcnow()
    first: dict[tuple[str, datetime], Checked] = {}
    repeats: list[Checked] = []
    for checked in capacity:
        key = (checked.datacenter_id, checked.loaded["reported_at"])
        if key in first:
            repeats.append(checked)
        else:
            first[key] = checked
    rows = [
        {
            "datacenter_id": checked.datacenter_id,
            "reported_at": checked.loaded["reported_at"],
            "received_at": now,
            "report_sha256": checked.digest,
            "total_gpus": sum(gpu["total"] for gpu in checked.loaded["gpus"]),
            "allocated_gpus": sum(gpu["allocated"] for gpu in checked.loaded["gpus"]),
            "gpus": [dict(gpu) for gpu in checked.loaded["gpus"]],
        }
        for _key, checked in sorted(first.items())
    ]
    statement = (
        _insert(session)(_CAPACITY)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["datacenter_id", "reported_at"])
        .returning(_CAPACITY.c.datacenter_id, _CAPACITY.c.reported_at)
    )
    inserted = {(dc, as_utc(at)) for dc, at in session.execute(statement)}
    refusals = []
    for checked in [*first.values(), *repeats]:
        key = (checked.datacenter_id, checked.loaded["reported_at"])
        if key in inserted and first[key] is checked:
            continue
        stored = (
            first[key].digest
            if key in inserted
            else session.scalar(
                select(_CAPACITY.c.report_sha256).where(
                    _CAPACITY.c.datacenter_id == key[0],
                    _CAPACITY.c.reported_at == key[1],
                )
            )
        )
        if stored != checked.digest:
            refusals.append(
                (
                    checked.index,
                    Refused(
                        Reason.CONFLICTING_DUPLICATE,
                        f"a different capacity report for {format_ts(key[1])}"
                        " was stored before",
                    ),
                )
            )
    return refusals


# -- dead letters --------------------------------------------------------------


def _clean(text_: str, limit: int | None = None) -> str:
    """Text any database accepts: no NUL, no lone surrogates."""
    text_ = text_.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return text_[:limit] if limit else text_


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {_clean(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return _clean(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        return _clean(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return _clean(str(value))


def dead_letter_row(message: RawMessage, refused: Refused) -> DeadLetter:
    datacenter_id, _kind = validation.split_routing_key(message.routing_key)
    record_id = None
    if message.routing_key.endswith("." + validation.USAGE):
        record_id = validation.readable_record_id(message.body)
    properties = {
        name: message.properties.get(name)
        for name in ("content_type", "content_encoding", "message_id")
        if message.properties.get(name) is not None
    }
    return DeadLetter(
        received_at=utcnow(),
        routing_key=_clean(message.routing_key, 255),
        datacenter_id=_clean(datacenter_id, 255),
        record_id=record_id,
        reason=refused.reason,
        detail=_clean(refused.detail_text),
        headers=json.loads(json.dumps(_json_safe(message.headers))),
        # An oversized body is kept in part: enough to see what it was.
        body=_clean(
            message.body[: validation.MAX_BODY_BYTES].decode("utf-8", "replace")
        ),
        properties=json.loads(json.dumps(_json_safe(properties))),
    )


def store_dead_letter(session: Session, message: RawMessage, refused: Refused) -> None:
    """Keep one refused message, whole, with its reason (it is then acked)."""
    session.rollback()
    session.add(dead_letter_row(message, refused))
    session.commit()


# -- poison messages -----------------------------------------------------------

_ATTEMPTS = DeliveryAttempt.__table__


def message_key(message: RawMessage) -> str:
    """What identifies a delivery across redeliveries: its routing key and body."""
    digest = hashlib.sha256(message.routing_key.encode("utf-8", "replace"))
    digest.update(b"\x1f")
    digest.update(message.body)
    return digest.hexdigest()


def record_failure(
    session: Session, message: RawMessage, error: BaseException, max_attempts: int
) -> bool:
    """Count one failed attempt of ``message`` processed alone (own transaction).

    Returns True when this was attempt ``max_attempts``: the message is then
    stored as a ``processing_error`` dead letter (with the exception) and the
    caller acks it; False: the caller requeues it. Raises if the database
    cannot be written either (then nothing is counted and it is requeued).
    """
    session.rollback()
    key = message_key(message)
    error_text = _clean(f"{type(error).__name__}: {error}", 2000)
    now = utcnow()
    statement = _insert(session)(_ATTEMPTS).values(
        message_key=key, attempts=1, last_error=error_text, updated_at=now
    )
    statement = statement.on_conflict_do_update(
        index_elements=["message_key"],
        set_={
            "attempts": _ATTEMPTS.c.attempts + 1,
            "last_error": statement.excluded.last_error,
            "updated_at": statement.excluded.updated_at,
        },
    ).returning(_ATTEMPTS.c.attempts)
    try:
        attempts = session.execute(statement).scalar_one()
        exhausted = attempts >= max_attempts
        if exhausted:
            session.execute(_ATTEMPTS.delete().where(_ATTEMPTS.c.message_key == key))
            refused = Refused(
                Reason.PROCESSING_ERROR,
                f"failed {attempts} times on its own; last: {error_text}",
            )
            session.add(dead_letter_row(message, refused))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return exhausted


def forget_failures(session: Session, message: RawMessage) -> None:
    """A message that went through after failing: its count starts again."""
    try:
        session.execute(
            _ATTEMPTS.delete().where(_ATTEMPTS.c.message_key == message_key(message))
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise


def replayable(letter: DeadLetter) -> RawMessage:
    """The message a dead letter was made from, as it was received."""
    properties = dict(letter.properties or {})
    properties.setdefault("content_type", "application/json")  # stored before 0002
    return RawMessage(
        body=letter.body.encode("utf-8"),
        headers=dict(letter.headers or {}),
        properties=properties,
        routing_key=letter.routing_key,
        redelivered=True,
    )
