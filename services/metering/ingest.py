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
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.common import contracts, signing
from services.common.amqp import RawMessage, federation_key
from services.common.units import format_ts, utcnow
from services.metering import domain
from services.metering.domain import Reason, Refused
from services.metering.models import (
    CapacityReport,
    DeadLetter,
    DeliveryAttempt,
    MeteredDatacenter,
    UsageRecord,
    UsageRollup,
)
from services.metering.registry import CachedRegistry

RECORD_FIELDS = domain.RECORD_FIELDS
_RECORDS = UsageRecord.__table__
_ROLLUPS = UsageRollup.__table__
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


@dataclass(frozen=True)
class Outgoing:
    """A federation event to publish once the transaction has committed."""

    routing_key: str
    event_id: str
    body: bytes  # the JSON to publish, made once (domain.usage_rated_body)

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Checked:
    """A message that passed every rule that does not need the database."""

    index: int
    kind: str
    datacenter_id: str
    loaded: dict[str, Any]
    digest: str
    row: dict[str, Any] | None = None  # usage: the row to insert
    wire: bytes | None = None  # usage: its canonical JSON (domain.record_json)


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


def _verified_body(
    registry: CachedRegistry, message: RawMessage, datacenter_id: str
) -> tuple[dict, dict]:
    """Envelope, data centre and signature checks; returns (datacenter, JSON)."""
    domain.check_envelope(message.body, message.content_type)
    datacenter = registry.datacenter(datacenter_id) if datacenter_id else None
    if datacenter is None:
        raise Refused(
            Reason.UNKNOWN_DATACENTER, f"{datacenter_id[:64]!r} is not registered"
        )
    key_id = domain.header_text(message.headers, signing.KEY_ID_HEADER)
    keys = registry.signing_keys(datacenter_id, key_id)
    domain.check_signature(message.body, message.headers, keys)
    return datacenter, domain.parse_body(message.body)


def check(
    registry: CachedRegistry, message: RawMessage, index: int, rated_at: datetime
) -> Checked:
    """Every rule but dedup; raises :class:`Refused` with the first one broken."""
    datacenter_id, kind = domain.split_routing_key(message.routing_key)
    if kind not in (domain.USAGE, domain.CAPACITY):
        raise Refused(
            Reason.SCHEMA, f"routing key {message.routing_key[:255]!r} is not metered"
        )
    datacenter, data = _verified_body(registry, message, datacenter_id)
    if kind == domain.CAPACITY:
        report = domain.load_capacity(data, datacenter_id)
        digest = domain.canonical_sha256(report, contracts.CapacityReportSchema)
        return Checked(index, kind, datacenter_id, report, digest)

    record = domain.load_usage(data, datacenter_id)
    rating = domain.rate(record, datacenter)
    city = None
    if record["voucher_code"] is not None:
        record["voucher_code"] = domain.normalise_voucher_code(record["voucher_code"])
        prefix = domain.voucher_prefix(record["voucher_code"])
        city = registry.city_of_prefix(prefix)
        if city is None:
            raise domain.unknown_prefix(prefix)
    wire = domain.record_json(record)  # once: for the digest and the event
    digest = hashlib.sha256(wire).hexdigest()
    row = {name: record[name] for name in RECORD_FIELDS}
    row.update(
        record_sha256=digest,
        city=city,
        cost_fen=rating.cost_fen,
        unit_price_fen_per_gpu_hour=rating.unit_price_fen_per_gpu_hour,
        government_run=rating.datacenter["government_run"],
        hub_region=rating.datacenter["hub_region"],
        chip_origin=rating.datacenter["chip_origin"],
        rated_at=rated_at,
    )
    return Checked(index, kind, datacenter_id, record, digest, row, wire)


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
    for index, message in enumerate(messages):
        try:
            checked = check(registry, message, index, rated_at)
        except Refused as refused:
            refusals.append((index, refused))
            continue
        (usage if checked.kind == domain.USAGE else capacity).append(checked)

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
    first: dict[domain.RecordKey, Checked] = {}
    repeats: list[Checked] = []
    for checked in usage:
        key = (checked.datacenter_id, checked.loaded["record_id"])
        if key in first:
            repeats.append(checked)
        else:
            first[key] = checked

    _lock_records(session, first.values())
    inserted_keys, correctors = _insert_records(
        session, [c.row for c in first.values()]
    )
    outcome.inserted = len(inserted_keys)

    stored_before = [key for key in first if key not in inserted_keys]
    stored_rows = _stored_rows(session, stored_before)
    for checked in [*(first[key] for key in stored_before), *repeats]:
        key = (checked.datacenter_id, checked.loaded["record_id"])
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
    for key in inserted_keys:
        outcome.outgoing.extend(events_of(first[key].row, first[key].wire))
    return refusals


def _lock_records(session: Session, checked: Iterable[Checked]) -> None:
    """Serialise against other writers of the same records or their corrections."""
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite has one writer at a time anyway
    keys = set()
    for item in checked:
        keys.add(domain.lock_key(item.datacenter_id, item.loaded["record_id"]))
        if item.loaded["correction_of"] is not None:
            keys.add(domain.lock_key(item.datacenter_id, item.loaded["correction_of"]))
    # In one order everywhere, so two batches never wait for each other in a ring.
    session.execute(
        text(
            "SELECT count(pg_advisory_xact_lock(k)) FROM "
            "(SELECT unnest(CAST(:keys AS bigint[])) AS k ORDER BY 1) AS ordered"
        ),
        # as an array literal: cheaper to send than a list dumped item by item
        {"keys": "{" + ",".join(map(str, sorted(keys))) + "}"},
    )


def _insert(session: Session):
    dialect = session.get_bind().dialect.name
    return {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]


Correctors = dict[domain.RecordKey, set[domain.RecordKey]]


def _insert_records(
    session: Session, rows: list[dict[str, Any]]
) -> tuple[set[domain.RecordKey], Correctors | None]:
    """Insert what is new; returns the keys actually inserted (RETURNING) and,
    on PostgreSQL, the records stored *before* this statement that name one
    of them in ``correction_of`` (``{corrected: {correctors}}``), found by the
    same statement. On SQLite that second part is None (asked separately)."""
    if not rows:
        return set(), {}
    if session.get_bind().dialect.name == "postgresql":
        inserted: set[domain.RecordKey] = set()
        correctors: Correctors = {}
        for dc, record_id, corrector in _copy_in(session, _RECORDS, rows):
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
# (and is seen) or waits for this transaction (and sees these records).
_RECORD_COLUMNS = [name for name in _RECORDS.c.keys() if name != "id"]
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
        " AND stored.correction_of = inserted.record_id",
    ),
    "usage_rollups_hourly": (
        [*_BUCKET, "records", "gpu_seconds", "cost_fen"],
        "INSERT INTO usage_rollups_hourly ({names})"
        " SELECT {names} FROM incoming_usage_rollups_hourly"
        " ORDER BY " + ", ".join(_BUCKET) + " ON CONFLICT (" + ", ".join(_BUCKET) + ")"
        " DO UPDATE SET"
        " records = usage_rollups_hourly.records + excluded.records,"
        " gpu_seconds = usage_rollups_hourly.gpu_seconds + excluded.gpu_seconds,"
        " cost_fen = usage_rollups_hourly.cost_fen + excluded.cost_fen",
    ),
}
# Keys of the SQLAlchemy connection's ``info`` (which lives as long as the
# database connection): the staging tables it has, the data-centre attributes
# it has written.
_STAGING_READY = "metering_staging_ready"  # {staging table: its column types}
_DATACENTERS_WRITTEN = "metering_datacenters_written"


def _copy_in(session: Session, table, rows: list[dict[str, Any]]) -> list[tuple]:
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
            for row in rows:
                write_row([row[name] for name in columns])
        cursor.execute(move.format(names=names))
        return cursor.fetchall() if cursor.description else []


def _stored_rows(
    session: Session, keys: Iterable[domain.RecordKey]
) -> dict[domain.RecordKey, dict[str, Any]]:
    keys = list(keys)
    found: dict[domain.RecordKey, dict[str, Any]] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        rows = session.execute(
            select(*_ROW_COLUMNS).where(
                tuple_(_RECORDS.c.datacenter_id, _RECORDS.c.record_id).in_(chunk)
            )
        )
        for row in rows.mappings():
            found[(row["datacenter_id"], row["record_id"])] = dict(row)
    return found


def _corrections_of(
    session: Session, keys: Iterable[domain.RecordKey]
) -> list[tuple[domain.RecordKey, domain.RecordKey]]:
    """Every stored ``(corrector, corrected)`` whose corrected record is in ``keys``."""
    keys = list(keys)
    pairs = []
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        rows = session.execute(
            select(
                _RECORDS.c.datacenter_id,
                _RECORDS.c.record_id,
                _RECORDS.c.correction_of,
            ).where(
                tuple_(_RECORDS.c.datacenter_id, _RECORDS.c.correction_of).in_(chunk)
            )
        )
        pairs.extend(((dc, record), (dc, corrected)) for dc, record, corrected in rows)
    return pairs


def _update_rollups(
    session: Session,
    inserted: dict[domain.RecordKey, dict[str, Any]],
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
    changes = domain.effectiveness_changes(
        set(inserted), set(stored_targets), corrections
    )
    rows = {**stored_targets, **inserted}
    buckets: dict[domain.RollupKey, list[int]] = defaultdict(lambda: [0, 0, 0])
    for key, sign in changes.items():
        for bucket, records, gpu_seconds, cost in domain.rollup_contribution(
            rows[key], sign
        ):
            total = buckets[bucket]
            total[0] += records
            total[1] += gpu_seconds
            total[2] += cost
    _upsert_rollups(session, buckets)


def _upsert_rollups(
    session: Session, buckets: Mapping[domain.RollupKey, list[int]]
) -> None:
    """Add to each hourly bucket atomically (no read-modify-write), in key order
    so that two writers never deadlock on the same buckets."""
    if not buckets:
        return
    values = [
        {
            **dict(zip(_BUCKET, bucket, strict=True)),
            "records": records,
            "gpu_seconds": gpu_seconds,
            "cost_fen": cost,
        }
        for bucket, (records, gpu_seconds, cost) in sorted(buckets.items())
    ]
    if session.get_bind().dialect.name == "postgresql":
        _copy_in(session, _ROLLUPS, values)
        return
    statement = _insert(session)(_ROLLUPS)
    statement = statement.on_conflict_do_update(
        index_elements=list(_BUCKET),
        set_={
            "records": _ROLLUPS.c.records + statement.excluded.records,
            "gpu_seconds": _ROLLUPS.c.gpu_seconds + statement.excluded.gpu_seconds,
            "cost_fen": _ROLLUPS.c.cost_fen + statement.excluded.cost_fen,
        },
    )
    # RETURNING makes SQLAlchemy send the rows as multi-row VALUES
    # ("insertmanyvalues"), not one statement per row.
    session.execute(statement.returning(_ROLLUPS.c.id), values).all()


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
    ``wire``: its :func:`domain.record_json`, when known."""
    city = row["city"]
    if city is None:
        return []
    rating = domain.Rating(
        cost_fen=row["cost_fen"],
        unit_price_fen_per_gpu_hour=row["unit_price_fen_per_gpu_hour"],
        datacenter={
            "government_run": row["government_run"],
            "hub_region": row["hub_region"],
            "chip_origin": row["chip_origin"],
        },
    )
    return [
        Outgoing(
            routing_key=_usage_rated_key(city),
            event_id=domain.usage_rated_event_id(
                row["datacenter_id"], row["record_id"]
            ),
            body=domain.usage_rated_body(row, city, rating, row["rated_at"], wire),
        )
    ]


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
    datacenter_id, _kind = domain.split_routing_key(message.routing_key)
    record_id = None
    if message.routing_key.endswith("." + domain.USAGE):
        record_id = domain.readable_record_id(message.body)
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
        body=_clean(message.body[: domain.MAX_BODY_BYTES].decode("utf-8", "replace")),
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
