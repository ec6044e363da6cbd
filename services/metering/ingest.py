"""The use cases behind metering's consumer: one message in, its effects stored.

:func:`process` checks a message (``domain``) against the registry (through
the cache), stores its effects in one transaction and returns the federation
events to publish *after* the commit. A message that breaks a rule raises
``domain.Refused``; :func:`store_dead_letter` keeps it. Anything else (the
database or the registry down) propagates, so the message is requeued.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common import contracts, signing
from services.common.amqp import RawMessage, federation_key
from services.common.units import format_ts, utcnow
from services.metering import domain
from services.metering.domain import Reason, Refused
from services.metering.models import (
    CapacityReport,
    DeadLetter,
    UsageRecord,
    UsageRollup,
)
from services.metering.registry import CachedRegistry

RECORD_FIELDS = tuple(contracts.UsageRecordSchema().fields)


@dataclass(frozen=True)
class Outgoing:
    """A federation event to publish once the transaction has committed."""

    routing_key: str
    event_id: str
    payload: dict[str, Any]


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def process(
    session: Session, registry: CachedRegistry, message: RawMessage
) -> list[Outgoing]:
    datacenter_id, kind = domain.split_routing_key(message.routing_key)
    if kind == domain.USAGE:
        return process_usage(session, registry, message, datacenter_id)
    if kind == domain.CAPACITY:
        process_capacity(session, registry, message, datacenter_id)
        return []
    raise Refused(Reason.SCHEMA, f"routing key {message.routing_key!r} is not metered")


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


# -- usage ---------------------------------------------------------------------


def process_usage(
    session: Session, registry: CachedRegistry, message: RawMessage, datacenter_id: str
) -> list[Outgoing]:
    datacenter, data = _verified_body(registry, message, datacenter_id)
    record = domain.load_usage(data, datacenter_id)
    rating = domain.rate(record, datacenter)
    city = None
    if record["voucher_code"] is not None:
        record["voucher_code"] = domain.normalise_voucher_code(record["voucher_code"])
        prefix = domain.voucher_prefix(record["voucher_code"])
        city = registry.city_of_prefix(prefix)
        if city is None:
            raise domain.unknown_prefix(prefix)
    digest = domain.canonical_sha256(record)

    for _attempt in range(2):
        existing = _find_record(session, datacenter_id, record["record_id"])
        if existing is not None:
            return _redelivered(existing, digest)
        try:
            row = _insert_record(session, record, city, rating, digest)
            session.commit()
        except IntegrityError:
            # Another worker stored the same (datacenter_id, record_id) first.
            session.rollback()
            continue
        return _events_of(row)
    raise RuntimeError("usage record neither inserted nor found")  # pragma: no cover


def _find_record(session: Session, datacenter_id: str, record_id: str):
    return session.scalar(
        select(UsageRecord).where(
            UsageRecord.datacenter_id == datacenter_id,
            UsageRecord.record_id == record_id,
        )
    )


def _redelivered(existing: UsageRecord, digest: str) -> list[Outgoing]:
    """Same body: nothing changes, but its event goes out again (same id)."""
    if existing.record_sha256 != digest:
        raise Refused(
            Reason.CONFLICTING_DUPLICATE,
            f"record {existing.record_id!r} was stored {_ts(existing.rated_at)} "
            "with a different body",
        )
    return _events_of(existing)


def _ts(moment: datetime) -> str:
    return format_ts(as_utc(moment))


def _insert_record(
    session: Session,
    record: Mapping[str, Any],
    city: str | None,
    rating: domain.Rating,
    digest: str,
) -> UsageRecord:
    row = UsageRecord(
        **{name: record[name] for name in RECORD_FIELDS},
        record_sha256=digest,
        city=city,
        cost_fen=rating.cost_fen,
        unit_price_fen_per_gpu_hour=rating.unit_price_fen_per_gpu_hour,
        government_run=rating.datacenter["government_run"],
        hub_region=rating.datacenter["hub_region"],
        chip_origin=rating.datacenter["chip_origin"],
        rated_at=utcnow().replace(microsecond=0),
    )
    session.add(row)
    session.flush()  # the unique key is checked here, before the rollup moves
    _add_to_rollup(session, row)
    return row


def _add_to_rollup(session: Session, row: UsageRecord) -> None:
    """Upsert the record into its hourly bucket, atomically (no read-modify-write)."""
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    table = UsageRollup.__table__
    statement = insert(table).values(
        datacenter_id=row.datacenter_id,
        city=row.city or "",
        tenant_id=row.tenant_id,
        voucher_code=row.voucher_code or "",
        gpu_model=row.gpu_model,
        hour=domain.hour_of(as_utc(row.started_at)),
        records=1,
        gpu_seconds=row.gpu_seconds,
        cost_fen=row.cost_fen,
    )
    statement = statement.on_conflict_do_update(
        index_elements=[
            "datacenter_id",
            "city",
            "tenant_id",
            "voucher_code",
            "gpu_model",
            "hour",
        ],
        set_={
            "records": table.c.records + statement.excluded.records,
            "gpu_seconds": table.c.gpu_seconds + statement.excluded.gpu_seconds,
            "cost_fen": table.c.cost_fen + statement.excluded.cost_fen,
        },
    )
    session.execute(statement)


def _events_of(row: UsageRecord) -> list[Outgoing]:
    if row.city is None:
        return []
    record = {name: getattr(row, name) for name in RECORD_FIELDS}
    record["started_at"] = as_utc(record["started_at"])
    record["ended_at"] = as_utc(record["ended_at"])
    rating = domain.Rating(
        cost_fen=row.cost_fen,
        unit_price_fen_per_gpu_hour=row.unit_price_fen_per_gpu_hour,
        datacenter={
            "government_run": row.government_run,
            "hub_region": row.hub_region,
            "chip_origin": row.chip_origin,
        },
    )
    payload = domain.usage_rated_event(record, row.city, rating, as_utc(row.rated_at))
    return [
        Outgoing(
            routing_key=federation_key(row.city, "usage_rated"),
            event_id=payload["event_id"],
            payload=payload,
        )
    ]


# -- capacity ------------------------------------------------------------------


def process_capacity(
    session: Session, registry: CachedRegistry, message: RawMessage, datacenter_id: str
) -> None:
    _datacenter, data = _verified_body(registry, message, datacenter_id)
    report = domain.load_capacity(data, datacenter_id)
    digest = domain.canonical_sha256(report, contracts.CapacityReportSchema)
    for _attempt in range(2):
        existing = session.scalar(
            select(CapacityReport).where(
                CapacityReport.datacenter_id == datacenter_id,
                CapacityReport.reported_at == report["reported_at"],
            )
        )
        if existing is not None:
            if existing.report_sha256 != digest:
                raise Refused(
                    Reason.CONFLICTING_DUPLICATE,
                    f"a different capacity report for {_ts(existing.reported_at)}"
                    " was stored before",
                )
            return
        session.add(
            CapacityReport(
                datacenter_id=datacenter_id,
                reported_at=report["reported_at"],
                received_at=utcnow(),
                report_sha256=digest,
                total_gpus=sum(gpu["total"] for gpu in report["gpus"]),
                allocated_gpus=sum(gpu["allocated"] for gpu in report["gpus"]),
                gpus=[dict(gpu) for gpu in report["gpus"]],
            )
        )
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        return


# -- dead letters --------------------------------------------------------------


def _clean(text: str, limit: int | None = None) -> str:
    """Text any database accepts: no NUL, no lone surrogates."""
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return text[:limit] if limit else text


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


def store_dead_letter(session: Session, message: RawMessage, refused: Refused) -> None:
    """Keep a refused message, whole, with its reason (it is then acked)."""
    session.rollback()
    datacenter_id, _kind = domain.split_routing_key(message.routing_key)
    record_id = None
    if message.routing_key.endswith("." + domain.USAGE):
        record_id = domain.readable_record_id(message.body)
    session.add(
        DeadLetter(
            received_at=utcnow(),
            routing_key=_clean(message.routing_key, 255),
            datacenter_id=_clean(datacenter_id, 255),
            record_id=record_id,
            reason=refused.reason,
            detail=_clean(refused.detail_text),
            headers=json.loads(json.dumps(_json_safe(message.headers))),
            # An oversized body is kept in part: enough to see what it was.
            body=_clean(
                message.body[: domain.MAX_BODY_BYTES].decode("utf-8", "replace")
            ),
        )
    )
    session.commit()
