"""Metering's rollups: hourly buckets, capacity and corrections (no I/O).

A stored usage record counts once in the hour its span started; its
GPU-seconds and cost are spread pro rata over the UTC hours of its span
(:func:`spread_over_hours`), in exact integers. A record stops counting when
a stored record corrects it (:func:`effectiveness_changes`); a record is
corrected once (:func:`competing_corrections`: the first correction stored
wins, any other is ``already_corrected``). Capacity reports
turn into GPU-seconds of capacity (:func:`capacity_gpu_seconds`), the divisor
of utilisation.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

# Capacity reports come at least every 5 minutes; one report stands for at
# most this long, so a data centre that stops reporting stops counting.
CAPACITY_SLICE = timedelta(seconds=300)


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour a record's span began in: its rollup bucket."""
    return moment.replace(minute=0, second=0, microsecond=0)


# -- capacity and utilisation --------------------------------------------------


def capacity_gpu_seconds(
    reports: Iterable[tuple[datetime, int]], start: datetime, end: datetime
) -> int:
    """GPU-seconds of capacity a data centre reported within ``[start, end)``.

    ``reports`` are ``(reported_at, total GPUs)`` in time order. Each report
    stands for its total GPUs from its ``reported_at`` until the next report,
    but for at most 300 s (reports are due every 5 minutes; a silent data
    centre stops counting); the last one stands until ``end`` ("now"), also at
    most 300 s. Only the part of each slice inside the window counts, so pass
    the reports from ``start − 300 s`` on. Linear in the number of reports.
    """
    total = 0
    reports = list(reports)
    for index, (reported_at, gpus) in enumerate(reports):
        following = reports[index + 1][0] if index + 1 < len(reports) else end
        until = min(following, reported_at + CAPACITY_SLICE, end)
        since = max(reported_at, start)
        if until > since:
            total += gpus * int((until - since).total_seconds())
    return total


def utilisation(used_gpu_seconds: int, capacity_gpu_seconds_: int) -> float | None:
    """Used ÷ capacity, capped at 1.0; None when no capacity was reported.

    Usage is bucketed by the hour its span started, capacity by the second, so
    the ratio can overshoot slightly at the edge of a window: it is capped.
    """
    if capacity_gpu_seconds_ <= 0:
        return None
    return min(1.0, used_gpu_seconds / capacity_gpu_seconds_)


# -- rollups: spreading over hours, corrections --------------------------------

HOUR = timedelta(hours=1)
_MICROSECOND = timedelta(microseconds=1)


def spread_over_hours(
    amount: int, started: datetime, ended: datetime
) -> list[tuple[datetime, int]]:
    """Split ``amount`` over the UTC hours ``[started, ended)`` covers, pro rata.

    Exact integers: the share of the hours up to a boundary is
    ``⌊amount × elapsed / span⌋``, and each hour gets the difference of two
    such cumulative shares, so the shares always sum to ``amount``, each is
    within one unit of its exact value, and the remainders fall where the
    cumulative rounding puts them (never all in one hour). ``amount`` may be
    negative (taking back a corrected record) and is split the same way.
    """
    hours, elapsed, span = _hours_of_span(started, ended, started.utcoffset())
    if elapsed is None:
        return [(hours[0], amount)]
    return list(zip(hours, _shares(amount, elapsed, span), strict=True))


@functools.lru_cache(maxsize=4096)
def _hours_of_span(
    started: datetime, ended: datetime, _offset: timedelta | None
) -> tuple[tuple[datetime, ...], tuple[int, ...] | None, int]:
    """The hours ``[started, ended)`` covers, and the microseconds from
    ``started`` to the end of each of them (None: all in one hour), and the
    span in microseconds. Cached: many records share a span (a job's GPUs,
    an agent's sampling window), and it is asked twice per record.

    ``_offset`` (``started.utcoffset()``) is part of the key only: the hours
    are cut in ``started``'s own zone, and two equal instants in different
    zones are equal keys otherwise."""
    span = (ended - started) // _MICROSECOND
    hour = hour_of(started)
    if span <= 0 or hour + HOUR >= ended:
        return (hour,), None, span
    hours = []
    elapsed = []
    while hour < ended:
        hours.append(hour)
        elapsed.append((min(hour + HOUR, ended) - started) // _MICROSECOND)
        hour += HOUR
    return tuple(hours), tuple(elapsed), span


def _shares(amount: int, elapsed: tuple[int, ...], span: int) -> list[int]:
    """Each hour's share of ``amount`` (see :func:`spread_over_hours`)."""
    negative = amount < 0
    amount = abs(amount)
    shares = []
    given = 0
    for upto in elapsed:
        cumulative = amount * upto // span
        shares.append(given - cumulative if negative else cumulative - given)
        given = cumulative
    return shares


RollupKey = tuple[str, str, str, str, str, datetime]


def rollup_contribution(
    row: Mapping[str, Any], sign: int = 1
) -> list[tuple[RollupKey, int, int, int]]:
    """What one stored record adds to the hourly rollups (``sign=-1`` removes it).

    ``[(bucket, records, gpu_seconds, cost_fen)]``: the record counts once, in
    the hour its span started; its GPU-seconds and its cost are spread over
    the hours of its span (:func:`spread_over_hours`).
    """
    started = _aware(row["started_at"])
    hours, elapsed, span = _hours_of_span(
        started, _aware(row["ended_at"]), started.utcoffset()
    )
    base = (
        row["datacenter_id"],
        row.get("city") or "",
        row["tenant_id"],
        row.get("voucher_code") or "",
        row["gpu_model"],
    )
    gpu_seconds, cost = sign * row["gpu_seconds"], sign * row["cost_fen"]
    if elapsed is None:
        return [((*base, hours[0]), sign, gpu_seconds, cost)]
    seconds = _shares(gpu_seconds, elapsed, span)
    costs = _shares(cost, elapsed, span)
    return [
        ((*base, hour), sign if n == 0 else 0, seconds[n], costs[n])
        for n, hour in enumerate(hours)
    ]


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


RecordKey = tuple[str, str]  # (datacenter_id, record_id)
_NO_KEYS: frozenset[RecordKey] = frozenset()


def effectiveness_changes(
    inserted: set[RecordKey],
    stored_targets: set[RecordKey],
    corrections: Iterable[tuple[RecordKey, RecordKey]],
) -> dict[RecordKey, int]:
    """Which records start (+1) or stop (−1) counting in the rollups.

    The rule: **a stored record counts in the rollups unless a stored record
    names it in ``correction_of``**. It depends only on the set of stored
    records, never on the order they arrived in, so late and out-of-order
    records, and a correction stored before its original, end as if in order.

    ``inserted`` are the records this transaction stored, ``stored_targets``
    the stored records that one of them corrects, ``corrections`` every
    stored ``(corrector, corrected)`` pair whose corrected record is in
    either set (including the ones just inserted).
    """
    correctors: dict[RecordKey, set[RecordKey]] = {}
    for corrector, corrected in corrections:
        correctors.setdefault(corrected, set()).add(corrector)
    changes = {}
    for key in inserted | stored_targets:
        by = correctors.get(key, _NO_KEYS)
        before = key not in inserted and not (by - inserted)
        after = not by
        if after != before:
            changes[key] = 1 if after else -1
    return changes


def competing_corrections(
    corrections: Iterable[tuple[RecordKey, RecordKey]],
    stored: Mapping[RecordKey, Iterable[str]],
) -> dict[RecordKey, str]:
    """The corrections to refuse ``already_corrected``: ``{corrector: the
    record id of the correction that holds its corrected record}``.

    The rule: **a record is corrected once; the first correction stored wins**,
    any other correction of the same record is refused (a correction of a
    correction, a chain, is a correction of another record: fine). Whether the
    corrected record itself is stored does not matter, so a correction that
    arrives before its original holds it as well.

    ``corrections``: the batch's new ``(corrector, corrected)`` pairs in batch
    order (an earlier one in the batch is stored first); ``stored``: the
    record ids of the stored corrections of each corrected record, read while
    the corrected records' locks are held. A corrector among those stored (a
    redelivery of itself) is not refused: dedup judges it.
    """
    holders = {key: set(ids) for key, ids in stored.items() if ids}
    refused: dict[RecordKey, str] = {}
    for corrector, corrected in corrections:
        held = holders.get(corrected)
        if held is None:
            holders[corrected] = {corrector[1]}
        elif corrector[1] not in held:
            refused[corrector] = min(held)
    return refused


def lock_key(datacenter_id: str, record_id: str) -> int:
    """A signed 64-bit key for a PostgreSQL advisory lock on one record id.

    A record and its correction lock the same key, so two metering processes
    storing them at the same time are serialised and the second one sees the
    first (otherwise each could miss the other, and both would count).
    """
    digest = hashlib.blake2b(
        f"{datacenter_id}\x1f{record_id}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)
