"""Deciding holds inside a batch's transaction (the rules: ``domain.holds``).

:func:`decide` runs after the batch's records are inserted and its rollups
moved, with what the rollups computed: which records start counting (+1)
and which stop (−1, replaced by a correction). Exact under competing
consumers, because every decision is made while holding the lock of what it
reads:

- **over_capacity**: the batch adds its records' hourly shares to
  ``capacity_buckets`` in one upsert, in key order (PostgreSQL: the upsert
  takes each bucket's row lock until commit, and in key order two batches
  never wait for each other in a ring; SQLite has one writer at a time).
  Its ``RETURNING`` gives each bucket's new total, every committed batch's
  included; only a bucket whose total exceeds the registered count × 3 600
  is read (its ``capacity_claims``, in the canonical order of their key) and
  decided (``domain.holds.over_capacity``). The hot path: one upsert and one
  insert per batch, nothing read.
- **double_claim**: only records naming ``gpu_uuids`` pay: an advisory lock
  per (data centre, GPU) in one order (PostgreSQL, the two-key form, apart
  from the records' one-key locks), then the stored ``gpu_claims`` of those
  GPUs over the records' time, then their own claims.

A stored record newly held is marked ``WHERE hold IS NULL … RETURNING``, so
of two transactions holding it (for two reasons) only the first announces it
(``usage_hold``). Runs inside the caller's transaction; never commits.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, select, text, tuple_, update
from sqlalchemy.orm import Session

from services.common.contracts import MAX_SPAN, canonical_json
from services.metering import store
from services.metering.domain import holds as rules
from services.metering.domain.rollups import RecordKey
from services.metering.models import (
    CapacityBucket,
    CapacityClaim,
    GpuClaim,
    UsageRecord,
)

_BUCKETS = CapacityBucket.__table__
_CLAIMS = CapacityClaim.__table__
_GPU_CLAIMS = GpuClaim.__table__
_RECORDS = UsageRecord.__table__
# The first key of PostgreSQL's two-key advisory locks on GPUs (the one-key
# locks on record ids are another key space: the two never meet).
_GPU_LOCK_CLASS = 15_004
BucketKey = tuple[str, str, datetime]  # (datacenter_id, gpu_model, hour)
Hold = dict[str, Any]


def hold_json(hold: Mapping[str, Any]) -> str:
    """A hold as stored in ``usage_records.hold`` and spliced into events."""
    return canonical_json(dict(hold)).decode()


def uuids_json(uuids: Iterable[str] | None) -> str | None:
    """``gpu_uuids`` as stored (a JSON array, in the record's order)."""
    return None if uuids is None else canonical_json(list(uuids)).decode()


def decide(
    session: Session,
    rows: Mapping[RecordKey, Mapping[str, Any]],
    changes: Mapping[RecordKey, int],
    registered: Mapping[tuple[str, str], int],
) -> dict[RecordKey, Hold]:
    """Move the buckets and claims by ``changes`` (key → +1 starts counting,
    −1 stops; ``rows`` has each one's row) and hold what now breaks a rule.

    ``registered``: the registered count of each (data centre, model) the
    batch rated. Returns every record this transaction held, with its hold
    (a record already held before is not in it)."""
    counting = sorted(key for key, sign in changes.items() if sign > 0)
    leaving = sorted(key for key, sign in changes.items() if sign < 0)
    if not counting and not leaving:
        return {}
    found: dict[RecordKey, Hold] = {}
    _over_capacity(session, rows, counting, leaving, registered, found)
    _double_claims(session, rows, counting, leaving, found)
    return _mark(session, found)


# -- over_capacity --------------------------------------------------------------


def _shares(row: Mapping[str, Any]) -> list[tuple[datetime, int]]:
    return rules.hour_shares(row["gpu_seconds"], row["started_at"], row["ended_at"])


def _over_capacity(
    session: Session,
    rows: Mapping[RecordKey, Mapping[str, Any]],
    counting: list[RecordKey],
    leaving: list[RecordKey],
    registered: Mapping[tuple[str, str], int],
    found: dict[RecordKey, Hold],
) -> None:
    deltas: dict[BucketKey, int] = defaultdict(int)
    added: list[tuple] = []  # store.CLAIM_COLUMNS
    for key in counting:
        row = rows[key]
        dc, model, record_id = row["datacenter_id"], row["gpu_model"], key[1]
        started = rules.utc(row["started_at"])
        for hour, share in _shares(row):
            deltas[(dc, model, hour)] += share
            added.append((dc, model, hour, started, record_id, share))
    dropped = []
    for key in leaving:
        row = rows[key]
        started = rules.utc(row["started_at"])
        for hour, share in _shares(row):
            bucket = (row["datacenter_id"], row["gpu_model"], hour)
            deltas[bucket] -= share
            dropped.append((*bucket, started, row["record_id"]))
    if not deltas:
        return
    # The claims first, the buckets' row locks last (held until the commit,
    # a few statements later): a bucket every batch adds to (a data centre's
    # current hour) waits on the others no longer than that.
    if not dropped and session.get_bind().dialect.name == "postgresql":
        # The hot path: one COPY and one statement (claims, then buckets).
        totals = {
            (dc, model, rules.utc(hour)): total
            for dc, model, hour, total in store.copy_claims(session, added)
        }
    else:
        if dropped:
            session.execute(
                delete(_CLAIMS).where(
                    tuple_(
                        _CLAIMS.c.datacenter_id,
                        _CLAIMS.c.gpu_model,
                        _CLAIMS.c.hour,
                        _CLAIMS.c.started_at,
                        _CLAIMS.c.record_id,
                    ).in_(dropped)
                )
            )
        if added:
            session.execute(
                _CLAIMS.insert(),
                [dict(zip(store.CLAIM_COLUMNS, claim, strict=True)) for claim in added],
            )
        totals = _move_buckets(session, deltas)
    new_claims: dict[BucketKey, set[tuple[datetime, str]]] = defaultdict(set)
    for dc, model, hour, started, record_id, _share in added:
        new_claims[(dc, model, hour)].add((started, record_id))
    for bucket, total in sorted(totals.items()):
        count = registered.get(bucket[:2])
        new = new_claims.get(bucket)
        if not new or count is None:
            continue  # nothing new in it: nothing newly over
        capacity = rules.capacity_of(count)
        if total <= capacity:
            continue  # the hot path: the bucket fits, nothing to read
        # Only the claims from the earliest new one on: the sum of those
        # before it is the total's rest, and their holds cannot change.
        since = min(new)
        claims = _bucket_claims(session, bucket, since)
        before = total - sum(claim.gpu_seconds for claim in claims)
        for record_id in rules.newly_over(claims, new, before, capacity):
            found.setdefault(
                (bucket[0], record_id),
                rules.capacity_hold(*bucket, count, total),
            )


def _move_buckets(
    session: Session, deltas: Mapping[BucketKey, int]
) -> dict[BucketKey, int]:
    """Add ``deltas`` to their buckets in key order (the row locks, in one
    order everywhere); returns each bucket's total after it."""
    statement = store.insert_for(session)(_BUCKETS)
    statement = statement.on_conflict_do_update(
        index_elements=["datacenter_id", "gpu_model", "hour"],
        set_={"gpu_seconds": _BUCKETS.c.gpu_seconds + statement.excluded.gpu_seconds},
    ).returning(
        _BUCKETS.c.datacenter_id,
        _BUCKETS.c.gpu_model,
        _BUCKETS.c.hour,
        _BUCKETS.c.gpu_seconds,
    )
    values = [
        {"datacenter_id": dc, "gpu_model": model, "hour": hour, "gpu_seconds": delta}
        for (dc, model, hour), delta in sorted(deltas.items())
    ]
    return {
        (dc, model, rules.utc(hour)): total
        for dc, model, hour, total in session.execute(statement.values(values)).all()
    }


def _bucket_claims(
    session: Session, bucket: BucketKey, since: tuple[datetime, str]
) -> list[rules.Claim]:
    """The bucket's claims from ``since`` (``(started_at, record_id)``) on,
    in the canonical order (a range of the primary key)."""
    dc, model, hour = bucket
    key = tuple_(_CLAIMS.c.started_at, _CLAIMS.c.record_id)
    rows = session.execute(
        select(_CLAIMS.c.started_at, _CLAIMS.c.record_id, _CLAIMS.c.gpu_seconds)
        .where(
            _CLAIMS.c.datacenter_id == dc,
            _CLAIMS.c.gpu_model == model,
            _CLAIMS.c.hour == hour,
            key >= tuple_(*since),
        )
        .order_by(_CLAIMS.c.started_at, _CLAIMS.c.record_id)
    )
    return [rules.Claim(rules.utc(at), rid, seconds) for at, rid, seconds in rows]


# -- double_claim ---------------------------------------------------------------


def _uuids(row: Mapping[str, Any]) -> list[str] | None:
    uuids = row.get("gpu_uuids")
    if isinstance(uuids, str):
        return json.loads(uuids)
    return uuids


def _gpu_lock_key(datacenter_id: str, uuid: str) -> int:
    digest = hashlib.blake2b(f"{datacenter_id}\x1f{uuid}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _double_claims(
    session: Session,
    rows: Mapping[RecordKey, Mapping[str, Any]],
    counting: list[RecordKey],
    leaving: list[RecordKey],
    found: dict[RecordKey, Hold],
) -> None:
    spans: dict[str, list[rules.GpuSpan]] = defaultdict(list)
    for key in counting:
        uuids = _uuids(rows[key])
        if uuids:
            row = rows[key]
            spans[key[0]].append(rules.span_of({**row, "gpu_uuids": uuids}))
    gone = [key for key in leaving if _uuids(rows[key])]
    if not spans and not gone:
        return
    if session.get_bind().dialect.name == "postgresql":
        lock_keys = sorted(
            {
                _gpu_lock_key(dc, uuid)
                for dc, new in spans.items()
                for span in new
                for uuid in span.gpu_uuids
            }
            | {_gpu_lock_key(key[0], u) for key in gone for u in _uuids(rows[key])}
        )
        session.execute(
            text(
                f"SELECT count(pg_advisory_xact_lock({_GPU_LOCK_CLASS}, k)) FROM "
                "(SELECT unnest(CAST('{" + ",".join(map(str, lock_keys)) + "}'"
                " AS integer[])) AS k ORDER BY 1) AS ordered"
            )
        )
    for dc, record_id in gone:  # replaced by a correction: claims no more
        session.execute(
            delete(_GPU_CLAIMS).where(
                _GPU_CLAIMS.c.datacenter_id == dc, _GPU_CLAIMS.c.record_id == record_id
            )
        )
    for dc, new in sorted(spans.items()):
        stored = _stored_spans(session, dc, new)
        new_ids = {span.record_id for span in new}
        pairs = rules.double_claims([*new, *stored])
        by_id = {span.record_id: span for span in [*stored, *new]}
        for record_id, others in sorted(pairs.items()):
            if record_id not in new_ids:
                others = others & new_ids  # stored ones: only against the new
                if not others:
                    continue
            shared = set().union(
                *(by_id[record_id].gpu_uuids & by_id[o].gpu_uuids for o in others)
            )
            found[(dc, record_id)] = rules.double_claim_hold(others, shared)
        session.execute(
            _GPU_CLAIMS.insert(),
            [
                {
                    "datacenter_id": dc,
                    "gpu_uuid": uuid,
                    "started_at": span.started_at,
                    "record_id": span.record_id,
                    "ended_at": span.ended_at,
                }
                for span in new
                for uuid in sorted(span.gpu_uuids)
            ],
        )


def _stored_spans(
    session: Session, dc: str, new: list[rules.GpuSpan]
) -> list[rules.GpuSpan]:
    """The stored claims on the GPUs of ``new`` that may overlap them (a span
    is at most ``MAX_SPAN`` long, so older starts cannot), one span a record."""
    uuids = sorted(set().union(*(span.gpu_uuids for span in new)))
    since = min(span.started_at for span in new) - MAX_SPAN
    until = max(span.ended_at for span in new)
    claimed: dict[str, list] = {}
    for start in range(0, len(uuids), 500):
        rows = session.execute(
            select(
                _GPU_CLAIMS.c.record_id,
                _GPU_CLAIMS.c.gpu_uuid,
                _GPU_CLAIMS.c.started_at,
                _GPU_CLAIMS.c.ended_at,
            ).where(
                _GPU_CLAIMS.c.datacenter_id == dc,
                _GPU_CLAIMS.c.gpu_uuid.in_(uuids[start : start + 500]),
                _GPU_CLAIMS.c.started_at > since,
                _GPU_CLAIMS.c.started_at < until,
            )
        )
        for record_id, uuid, started, ended in rows:
            entry = claimed.setdefault(
                record_id, [rules.utc(started), rules.utc(ended), set()]
            )
            entry[2].add(uuid)
    return [
        rules.GpuSpan(rid, started, ended, frozenset(uuids))
        for rid, (started, ended, uuids) in claimed.items()
    ]


# -- marking ----------------------------------------------------------------


def _mark(session: Session, found: dict[RecordKey, Hold]) -> dict[RecordKey, Hold]:
    """Store each hold on its record, unless it is held already; returns
    the ones stored. One statement per data centre and chunk, in key order
    (the records' row locks in one order)."""
    made: dict[RecordKey, Hold] = {}
    by_dc: dict[str, list[str]] = defaultdict(list)
    for dc, record_id in sorted(found):
        by_dc[dc].append(record_id)
    for dc, ids in by_dc.items():
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marked = session.execute(
                update(_RECORDS)
                .where(
                    _RECORDS.c.datacenter_id == dc,
                    _RECORDS.c.record_id.in_(chunk),
                    _RECORDS.c.hold.is_(None),
                )
                .values(
                    hold=case(
                        {rid: hold_json(found[(dc, rid)]) for rid in chunk},
                        value=_RECORDS.c.record_id,
                    )
                )
                .returning(_RECORDS.c.record_id)
            )
            for (record_id,) in marked:
                made[(dc, record_id)] = found[(dc, record_id)]
    return made
