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

Here: the rules and the batch (what is new, a duplicate or a conflicting
duplicate, and which events go out). The SQL is ``store`` (usage records,
rollups, totals, data centres), ``capacity`` (capacity reports) and
``dead_letters`` (refused and poison messages, replay).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.orm import Session

from services.common import contracts, signing
from services.common.amqp import RawMessage, federation_key
from services.common.principals import may_publish_for
from services.common.units import format_ts, rate_cost_fen, utcnow
from services.metering import holds, store
from services.metering.capacity import store_capacity
from services.metering.dead_letters import dead_letter_row
from services.metering.domain import encoding, rating, rollups, validation
from services.metering.domain.validation import Reason, Refused
from services.metering.registry import CachedRegistry


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
    registered: int = 0  # usage: the data centre's registered count of the model


@dataclass
class BatchOutcome:
    outgoing: list[Outgoing] = field(default_factory=list)
    # (index in the batch, why) of every message refused (stored as a dead letter).
    refused: list[tuple[int, Refused]] = field(default_factory=list)
    inserted: int = 0
    duplicates: int = 0


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

    __slots__ = (
        "registry",
        "_datacenters",
        "_keys",
        "_cities",
        "_codes",
        "_terms",
        "_publishers",
    )

    def __init__(self, registry: CachedRegistry):
        self.registry = registry
        self._datacenters: dict[str, dict] = {}
        self._keys: dict[str, dict[str, str]] = {}
        self._cities: dict[str, str] = {}
        # voucher code as sent → (normalised, its city)
        self._codes: dict[str, tuple[str, str]] = {}
        self._terms: dict[tuple[str, str], rating.ModelTerms] = {}
        self._publishers: set[tuple[object, str]] = set()  # (user_id, data centre)

    def may_publish(self, user_id: object, datacenter_id: str) -> bool:
        """Whether broker user ``user_id`` may publish ``datacenter_id``'s
        messages: the data centre's own user or the national side
        (``principals.may_publish_for``); asked once a batch per pair."""
        if (user_id, datacenter_id) in self._publishers:
            return True
        if not may_publish_for(user_id, datacenter_id, self.registry.state.national):
            return False
        self._publishers.add((user_id, datacenter_id))
        return True

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

    def model_terms(
        self, datacenter_id: str, datacenter: dict, gpu_model: str
    ) -> rating.ModelTerms:
        """``rating.model_terms`` of ``datacenter`` (this batch's for its id):
        the price terms and the registered count, from one look."""
        terms = self._terms.get((datacenter_id, gpu_model))
        if terms is None:
            terms = rating.model_terms(datacenter, gpu_model)
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
    # The broker validated user_id against the publishing connection's user;
    # topic permissions already confine dc.<id> to <id>.*: this is the second
    # lock of the same door (DESIGN.md §8, defence in depth).
    user_id = message.properties.get("user_id")
    if not lookups.may_publish(user_id, datacenter_id):
        raise Refused(
            Reason.WRONG_PUBLISHER,
            f"{message.routing_key[:255]!r} published by broker user "
            f"{str(user_id)[:80]!r}, not by {datacenter_id[:64]!r}'s own",
        )
    datacenter, data = _verified_body(lookups, message, datacenter_id)
    if kind == validation.CAPACITY:
        report = validation.load_capacity(data, datacenter_id)
        digest = encoding.canonical_sha256(report, contracts.CapacityReportSchema)
        return Checked(index, kind, datacenter_id, report, digest)

    record = validation.load_usage(data, datacenter_id)
    # rating and the inventory bound: the data-centre part asked once a batch
    price, government_run, hub_region, chip_origin, registered = lookups.model_terms(
        datacenter_id, datacenter, record["gpu_model"]
    )
    rating.check_inventory(
        record["gpu_count"], registered, datacenter_id, record["gpu_model"]
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
    if row["gpu_uuids"] is not None:  # stored as its JSON array
        row["gpu_uuids"] = holds.uuids_json(row["gpu_uuids"])
    row["hold"] = None  # decided once stored (services.metering.holds)
    return Checked(
        index,
        kind,
        datacenter_id,
        record,
        digest,
        row,
        wire,
        (datacenter_id, record["record_id"]),
        registered,
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
        refusals += store_capacity(session, capacity)
        store.remember_datacenters(session, (item.row for item in usage), rated_at)
        refusals.sort(key=lambda item: item[0])
        if store_refused:
            for index, refused in refusals:
                session.add(dead_letter_row(messages[index], refused))
        session.commit()
    except BaseException:
        session.rollback()
        store.forget_written(info)
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
        # Only dedup and corrections can refuse here (conflicting_duplicate,
        # already_corrected).
        raise outcome.refused[0][1]
    return outcome.outgoing


def _store_usage(
    session: Session, usage: list[Checked], outcome: BatchOutcome
) -> list[tuple[int, Refused]]:
    """Insert the new records and move the rollups (``store``); a copy of a
    stored record is a duplicate (its event goes out again) or, with another
    body, refused. Counts and events go into ``outcome``; returns the refused."""
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

    refusals += _refuse_competing_corrections(session, first, repeats)

    # The records' advisory locks are taken in the round trip that inserts them.
    inserted_keys, correctors = store.insert_records(
        session, [c.row for c in first.values()]
    )
    outcome.inserted = len(inserted_keys)

    stored_before = [key for key in first if key not in inserted_keys]
    stored_rows = store.stored_rows(session, stored_before)
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
                        f"{format_ts(store.as_utc(existing['rated_at']))} "
                        "with a different body",
                    ),
                )
            )
            continue
        outcome.duplicates += 1
        if key in inserted_keys:
            continue  # its event goes out with the inserted copy's (and hold)
        # The same fact again: its event goes out again, with the same id.
        outcome.outgoing.extend(events_of(existing))
    changes, rows = store.update_rollups(
        session, {key: first[key].row for key in inserted_keys}, correctors
    )
    registered = {
        (checked.datacenter_id, checked.row["gpu_model"]): checked.registered
        for checked in first.values()
    }
    held = holds.decide(session, rows, changes, registered)
    outgoing = outcome.outgoing
    for key in inserted_keys:
        checked = first[key]
        hold = held.pop(key, None)
        if hold is not None:
            checked.row["hold"] = holds.hold_json(hold)
        if checked.row["city"] is not None:  # events_of, the wire at hand
            outgoing.append(_usage_rated(checked.row, checked.wire))
    if held:  # stored before, rated without a hold, held now
        for key, row in sorted(store.stored_rows(session, held).items()):
            if row["city"] is not None:
                outgoing.append(_usage_hold(row, held[key]))
    return refusals


def _refuse_competing_corrections(
    session: Session, first: dict[rollups.RecordKey, Checked], repeats: list[Checked]
) -> list[tuple[int, Refused]]:
    """Take out of ``first`` (and ``repeats``) the corrections of a record that
    is already corrected (``rollups.competing_corrections``); returns their
    refusals. A refused record already stored under its id stays in: dedup
    judges it (a redelivery or ``conflicting_duplicate``). A later copy in the
    batch of a refused record is refused with it (nothing of it is stored)."""
    corrections = [
        (key, (checked.datacenter_id, checked.row["correction_of"]))
        for key, checked in first.items()
        if checked.row["correction_of"] is not None
    ]
    if not corrections:
        return []
    rows = [checked.row for checked in first.values()]
    held = store.held_corrections(session, rows, {target for _, target in corrections})
    refused = rollups.competing_corrections(corrections, held)
    if not refused:
        return []
    stored = store.stored_rows(session, refused)
    refusals: list[tuple[int, Refused]] = []
    for key, holder in refused.items():
        if key in stored:
            continue
        checked = first.pop(key)
        corrected = checked.row["correction_of"]
        why = Refused(
            Reason.ALREADY_CORRECTED,
            f"record {corrected!r} is already corrected by {holder!r}",
        )
        refusals.append((checked.index, why))
        refusals += [(repeat.index, why) for repeat in repeats if repeat.key == key]
    if refusals:
        repeats[:] = [repeat for repeat in repeats if repeat.key in first]
    return refusals


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
            None if row.get("hold") is None else row["hold"].encode(),
        ),
    )


def _usage_hold(row: Mapping[str, Any], hold: Mapping[str, Any]) -> Outgoing:
    """``<city>.usage_hold``: a record announced without a hold, held now.
    One id per record, whatever the reason: the city applies the first."""
    event_id = contracts.event_id("usage_hold", row["datacenter_id"], row["record_id"])
    body = contracts.make_event(
        "usage_hold",
        row["city"],
        event_id,
        record_id=row["record_id"],
        datacenter_id=row["datacenter_id"],
        voucher_code=row["voucher_code"],
        hold=dict(hold),
    )
    return Outgoing(
        federation_key(row["city"], "usage_hold"),
        event_id,
        contracts.canonical_json(body),
    )


@functools.lru_cache(maxsize=1024)
def _usage_rated_key(city: str) -> str:
    return federation_key(city, "usage_rated")
