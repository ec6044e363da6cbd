"""Retention: how long each table that grows with time keeps its rows, and
the one pruner every service runs to delete the rest (issue 16 item 6).

**The policy.** One ``RETENTION`` mapping in each process's configuration
(:data:`services.common.config.RETENTION`), a number of days per *class* of
rows, each with a default and a **floor** below which a value is a
:class:`~services.common.config.ConfigError` at start, so that a typo cannot
delete what is still needed. The classes, their defaults and the reasons for
their floors are in :data:`CLASSES` (and docs/ARCHITECTURE.md, "Retention").

**The pruner.** :func:`prune` deletes in batches of ``batch_size`` rows, each
batch its own short transaction::

    DELETE FROM t WHERE ctid = ANY(ARRAY(SELECT ctid FROM t WHERE <old>
                              LIMIT k FOR UPDATE SKIP LOCKED))  -- PostgreSQL
    DELETE FROM t WHERE pk IN (SELECT pk FROM t WHERE <old> LIMIT k)  -- SQLite

then commits and sleeps ``pause_s``. Why so:

- One ``DELETE … WHERE old`` of a large backlog holds every deleted row's
  lock (and on SQLite the database's one write lock) until it commits:
  writers that touch those rows, or any writer on SQLite, wait that long. A
  batch holds its locks for one batch only, and the pause lets waiting
  writers in between batches.
- ``SKIP LOCKED``: a row a writer holds (a dead letter being replayed, an
  outbox row being marked) is skipped this round instead of waited for, so
  the pruner never queues behind a writer, and no writer queues behind a
  pruner that is itself queued.
- By the rows chosen once (their addresses on PostgreSQL, a TID scan, since
  ``key IN (subquery)`` is planned there as a hash join over the whole
  table; their primary keys on SQLite), through an index on ``<old>``'s
  time column, so a batch costs the same however large the backlog. Every
  condition is on an immutable timestamp, or a ``published_at`` that only
  goes from null to set, so a row chosen is still old when deleted.

It returns what it did (:class:`Pruned`): rows, batches, seconds, and the
longest single batch transaction, the longest any writer can have waited on
the pruner; the services log it and the bench reports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Engine,
    Table,
    any_,
    delete,
    func,
    literal_column,
    select,
    tuple_,
)
from sqlalchemy.sql.elements import ColumnElement

from services.common.config import RETENTION, ConfigError
from services.common.contracts import MAX_SPAN
from services.common.units import utcnow

log = logging.getLogger(__name__)

DAY = timedelta(days=1)
DEFAULT_INTERVAL_S = 300.0
DEFAULT_BATCH_SIZE = 1000
DEFAULT_PAUSE_S = 0.05
# One tick deletes at most this many batches, so a first run on a large
# backlog does not hold the timer's worker for hours; the next tick goes on.
DEFAULT_MAX_BATCHES = 1000

# The longest window any overview reads raw capacity reports for
# (metering.reports.MAX_WINDOW_HOURS, 366 days) plus one report's slice.
CAPACITY_WINDOW_DAYS = 367
# How long after a voucher's expiry a late record may still be booked
# (services.vouchers.consent.MAX_GRACE_DAYS).
MAX_GRACE_DAYS = 90


@dataclass(frozen=True)
class RetentionClass:
    """One class of rows: its default and its floor in days, and why."""

    default_days: int
    floor_days: int
    why: str


CLASSES: dict[str, RetentionClass] = {
    # The idempotency records of consumers (the registry's processed_events).
    # An event applied once can come again only as a redelivery (a crash
    # between commit and ack, requeued), a publisher's relay of an event it
    # published but had not marked (at most the vouchers' outbox retention
    # later), or an operator's replay of a parked copy (at most the
    # dead-letter retention later). The queues have no message TTL, so a
    # queued duplicate waits as long as the consumer is down: 30 days is the
    # longest outage this design handles by redelivery (longer is an incident,
    # handled by reconciliation). The default, 400 days, outlives every
    # replayable copy (outbox 7, parked events 180).
    "processed_events": RetentionClass(
        400,
        30,
        "a duplicate can still arrive: redelivery after a consumer outage of up "
        "to 30 days, or the replay of a parked copy",
    ),
    # Outbox rows once the broker confirmed them (published_at set). Never an
    # unpublished one, whatever its age. A published row is read again only by
    # an agent's retry of the same POST (the gateway), which after pruning is
    # stored and published again: metering drops it by record_id, which it
    # keeps forever. One day covers any agent's retry loop.
    "outbox": RetentionClass(
        7, 1, "an agent's retry of the same POST is still told 'duplicate'"
    ),
    # Metering's raw capacity reports. They have no rollup table: the usage
    # overview sums them for windows of up to 366 days, so that window (plus
    # a slice) is the floor: a shorter retention would make a long window's
    # utilisation wrong, not merely shorter.
    "capacity_reports": RetentionClass(
        400,
        CAPACITY_WINDOW_DAYS,
        "the overview reads raw reports for windows of up to 366 days",
    ),
    # Metering's hold bookkeeping (capacity_buckets, capacity_claims,
    # gpu_claims), by the hour (or the end) they are about. A record for an
    # hour is checked against them; one arriving after they are gone is
    # checked against the claims still kept only. A record spans at most
    # MAX_SPAN, and is booked at the latest a voucher's grace period after
    # its expiry: below MAX_SPAN + MAX_GRACE_DAYS a record a city still
    # books would escape the capacity check.
    "capacity_holds": RetentionClass(
        400,
        MAX_SPAN.days + MAX_GRACE_DAYS,
        "a record a city can still book must meet its hour's claims",
    ),
    # Dead letters (metering) and parked events (registry): what an operator
    # reads and replays. 30 days is the least time to act on one.
    "dead_letters": RetentionClass(
        180, 30, "an operator must have time to read and replay them"
    ),
    # Counters of a message's failed attempts (metering's delivery_attempts):
    # a message that stopped failing (it succeeded, or its queue was purged)
    # leaves its row. A redelivery comes within minutes; a day is plenty.
    "delivery_attempts": RetentionClass(
        7, 1, "a failing message's redeliveries still count up"
    ),
    # The portal's audit log. China's Cybersecurity Law (art. 21) asks for
    # network logs kept no less than six months: the floor. The default, 400
    # days, covers a fiscal year and its audit.
    "audit": RetentionClass(
        400, 183, "logs must be kept at least six months (Cybersecurity Law, art. 21)"
    ),
}


@dataclass(frozen=True)
class RetentionPolicy:
    """The days per class, and how the timer prunes (checked at start)."""

    days: Mapping[str, int] = field(
        default_factory=lambda: {name: c.default_days for name, c in CLASSES.items()}
    )
    interval_s: float = DEFAULT_INTERVAL_S
    batch_size: int = DEFAULT_BATCH_SIZE
    pause_s: float = DEFAULT_PAUSE_S
    max_batches: int = DEFAULT_MAX_BATCHES
    enabled: bool = True

    def cutoff(self, name: str, now: datetime | None = None) -> datetime:
        """Rows of class ``name`` older than this may go."""
        return (now or utcnow()) - self.days[name] * DAY


def policy_from_config(config: Mapping[str, Any]) -> RetentionPolicy:
    """The policy in ``config[RETENTION]`` (absent: the defaults).

    ``RETENTION: {processed_events_days: 400, …, interval_s: 300,
    batch_size: 1000, pause_s: 0.05, max_batches: 1000, enabled: true}``.
    A value below its class's floor, an unknown key or a non-number is a
    :class:`ConfigError`, at start rather than at the first prune.
    """
    raw = config.get(RETENTION) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{RETENTION} must be a mapping, not {raw!r}")
    days = {name: c.default_days for name, c in CLASSES.items()}
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if key.endswith("_days") and key[: -len("_days")] in CLASSES:
            name = key[: -len("_days")]
            floor = CLASSES[name].floor_days
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{RETENTION}.{key} must be a whole number of days")
            if value < floor:
                raise ConfigError(
                    f"{RETENTION}.{key} is {value}, below its floor of {floor} "
                    f"days: {CLASSES[name].why}"
                )
            days[name] = value
        elif key in ("interval_s", "pause_s"):
            settings[key] = _number(key, value, minimum=0.0)
        elif key in ("batch_size", "max_batches"):
            settings[key] = int(_number(key, value, minimum=1, whole=True))
        elif key == "enabled":
            if not isinstance(value, bool):
                raise ConfigError(f"{RETENTION}.enabled must be true or false")
            settings[key] = value
        else:
            raise ConfigError(f"{RETENTION}: unknown key {key!r}")
    if settings.get("interval_s") == 0:
        raise ConfigError(f"{RETENTION}.interval_s must be positive")
    return RetentionPolicy(days=days, **settings)


def _number(key: str, value: Any, minimum: float, whole: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (whole and not isinstance(value, int))
        or value < minimum
    ):
        raise ConfigError(
            f"{RETENTION}.{key} must be a {'whole ' if whole else ''}number "
            f">= {minimum}, not {value!r}"
        )
    return value


@dataclass(frozen=True)
class Pruned:
    """What one :func:`prune` did."""

    table: str
    rows: int
    batches: int
    seconds: float
    # The longest single batch transaction: how long a writer can have waited.
    longest_batch_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def prune(
    engine: Engine,
    table: Table,
    old: ColumnElement[bool],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pause_s: float = DEFAULT_PAUSE_S,
    max_batches: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Pruned:
    """Delete the rows of ``table`` where ``old`` holds, ``batch_size`` at a
    time, each batch its own transaction, ``pause_s`` apart.

    ``old`` must only ever hold for rows nothing needs any more (the callers
    build it from a :class:`RetentionPolicy` cutoff and the row's own state:
    published, rolled up …). Stops when a batch deletes fewer than
    ``batch_size`` rows, or after ``max_batches``.
    """
    key = list(table.primary_key.columns)
    if not key:
        raise ValueError(f"{table.name} has no primary key to prune by")
    if engine.dialect.name == "postgresql":
        # By the rows' physical addresses (``ctid = ANY(ARRAY(…))``: a TID
        # scan), not their keys: PostgreSQL plans ``key IN (subquery)`` of a
        # large table as a hash join over all of it, a full scan per batch.
        # The addresses are stable: the subquery locks the rows it returns.
        ctid = literal_column("ctid")
        chosen = (
            select(ctid)
            .select_from(table)
            .where(old)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        )
        statement = delete(table).where(
            ctid == any_(func.array(chosen.scalar_subquery()))
        )
    else:
        chosen = select(*key).where(old).limit(batch_size)
        target = key[0] if len(key) == 1 else tuple_(*key)  # a row value IN (…)
        statement = delete(table).where(target.in_(chosen))
    rows = batches = 0
    longest = 0.0
    began = time.perf_counter()
    while max_batches is None or batches < max_batches:
        start = time.perf_counter()
        with engine.begin() as connection:
            deleted = connection.execute(statement).rowcount
        longest = max(longest, time.perf_counter() - start)
        batches += 1
        rows += deleted
        if deleted < batch_size:
            break
        if pause_s:
            sleep(pause_s)
    return Pruned(table.name, rows, batches, time.perf_counter() - began, longest)


@dataclass(frozen=True)
class Target:
    """One table a service prunes: which class, and what makes a row old."""

    table: Table
    retention: str  # a key of CLASSES
    old: Callable[[datetime], ColumnElement[bool]]  # cutoff → condition


def prune_targets(
    engine: Engine,
    targets: list[Target],
    policy: RetentionPolicy,
    now: datetime | None = None,
) -> list[Pruned]:
    """Prune each target by the policy; logs every table that lost rows.

    A failing table is logged and the others go on: one locked or missing
    table must not keep the rest growing.
    """
    if not policy.enabled:
        return []
    now = now or utcnow()
    done = []
    for target in targets:
        try:
            pruned = prune(
                engine,
                target.table,
                target.old(policy.cutoff(target.retention, now)),
                batch_size=policy.batch_size,
                pause_s=policy.pause_s,
                max_batches=policy.max_batches,
            )
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("pruning %s failed", target.table.name)
            continue
        done.append(pruned)
        if pruned.rows:
            log.info(
                "pruned %d rows of %s in %d batches, %.0f rows/s, longest "
                "batch %.1f ms",
                pruned.rows,
                pruned.table,
                pruned.batches,
                pruned.rows_per_s,
                pruned.longest_batch_s * 1000,
            )
    return done
