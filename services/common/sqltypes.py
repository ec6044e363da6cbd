"""Column types every service's tables share (SQLAlchemy only: no nameko, so the
data-centre gateway, which is not a nameko service, uses them too).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer
from sqlalchemy.types import TypeDecorator

# A 64-bit key; SQLite only auto-increments an INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator):
    """Aware UTC datetimes in Python, whatever the database keeps.

    SQLite has no time zones: values go in as naive UTC and come back marked
    UTC, so that comparisons in SQL and in Python agree. A naive datetime is
    refused: every time in computenet is UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: computenet keeps every time in UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
