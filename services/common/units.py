"""Money, GPU time, rates and timestamps: the one module that owns conversions.

Money is integer fen (1/100 CNY), GPU time integer GPU-seconds, rates integer
basis points (8000 = 80 %), timestamps timezone-aware UTC datetimes written as
ISO 8601 with ``Z``. Floats never hold money.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from services.common.errors import InvalidRequest

FEN_PER_CNY = 100
SECONDS_PER_HOUR = 3600
BP_DENOMINATOR = 10_000
# A UTC calendar month, as statements name it (issue 17).
MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")


def cny_to_fen(cny: int) -> int:
    """Whole CNY (as written in rules files) to fen."""
    if isinstance(cny, bool) or not isinstance(cny, int):
        raise TypeError("CNY amounts in configuration are whole numbers")
    return cny * FEN_PER_CNY


def percent_to_bp(percent: int | float) -> int:
    """A percentage from a rules file (80, or 12.5) to basis points."""
    bp = round(percent * 100)
    if abs(bp - percent * 100) > 1e-9:
        raise ValueError(f"{percent} % is finer than a basis point")
    return int(bp)


def format_cny(fen: int) -> str:
    """``123456789`` → ``'CNY 1,234,567.89'``, for people only."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), FEN_PER_CNY)
    return f"{sign}CNY {whole:,}.{cents:02d}"


def gpu_hours(gpu_seconds: int) -> float:
    """GPU-hours, for display only."""
    return gpu_seconds / SECONDS_PER_HOUR


def gpu_seconds_of(gpus: int, hours: float) -> int:
    """``gpus`` GPUs for ``hours`` hours (a request, not a record): GPU-seconds,
    rounded to the nearest second."""
    return round(gpus * hours * SECONDS_PER_HOUR)


def format_cny_grouped(fen: int) -> str:
    """``123456789`` → ``'1,234,567.89'``: the amount alone, thousands
    grouped (a statement's columns), for people only."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), FEN_PER_CNY)
    return f"{sign}{whole:,}.{cents:02d}"


def format_cny_amount(fen: int) -> str:
    """``123456`` → ``'1234.56'``: the amount alone, for people only."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), FEN_PER_CNY)
    return f"{sign}{whole}.{cents:02d}"


def format_gpu_hours(gpu_seconds: int) -> str:
    """``5400`` → ``'1.50'``: GPU-hours to the hundredth, rounded half up
    (away from zero for a reversal's negative seconds), integer arithmetic."""
    sign = "-" if gpu_seconds < 0 else ""
    hundredths = (abs(gpu_seconds) * 100 + SECONDS_PER_HOUR // 2) // SECONDS_PER_HOUR
    whole, part = divmod(hundredths, 100)
    return f"{sign}{whole}.{part:02d}"


def format_rate(rate_bp: int) -> str:
    """``8000`` → ``'80 %'``, ``550`` → ``'5.5 %'``, for people only."""
    return f"{rate_bp / 100:g} %"


def rate_cost_fen(gpu_seconds: int, price_fen_per_gpu_hour: int) -> int:
    """The rental cost of one usage record, in fen.

    The rounding rule (documented in the README): the exact cost
    ``gpu_seconds × price / 3600`` is rounded half up to a whole fen, once per
    record. Integer arithmetic only.
    """
    if gpu_seconds < 0 or price_fen_per_gpu_hour < 0:
        raise ValueError("gpu_seconds and price must be non-negative")
    return (
        gpu_seconds * price_fen_per_gpu_hour + SECONDS_PER_HOUR // 2
    ) // SECONDS_PER_HOUR


def apply_rate_fen(cost_fen: int, rate_bp: int) -> int:
    """``cost × rate``, rounded down: a subsidy never exceeds rate × cost."""
    return cost_fen * rate_bp // BP_DENOMINATOR


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_ts(moment: datetime) -> str:
    """A UTC datetime as ISO 8601 with ``Z`` and whole seconds."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: computenet keeps every time in UTC")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(text: str) -> datetime:
    """ISO 8601 with ``Z`` or an explicit offset → aware UTC datetime."""
    if not isinstance(text, str):
        raise ValueError("timestamp must be a string")
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone; write it in UTC with Z")
    return moment.astimezone(UTC)


def month_bounds(month: Any) -> tuple[datetime, datetime]:
    """``'2026-03'`` → (its first instant, the next month's), UTC.

    ``InvalidRequest invalid_month`` for anything but ``YYYY-MM``."""
    found = MONTH.fullmatch(month) if isinstance(month, str) else None
    # Years the ledger can hold, with a next month to end the last one.
    if found is None or not 1970 <= int(found[1]) <= 9998:
        raise InvalidRequest(
            "invalid_month",
            "month must be YYYY-MM (a UTC calendar month)",
            {"month": [month if isinstance(month, str) else repr(month)]},
        )
    year, number = int(found[1]), int(found[2])
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start, end


def month_of(moment: datetime) -> str:
    """The UTC calendar month of ``moment``, ``YYYY-MM``."""
    return moment.astimezone(UTC).strftime("%Y-%m")
