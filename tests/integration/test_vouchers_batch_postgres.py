"""Booking a batch equals booking its records one by one, on PostgreSQL.

The unit test (``tests/unit/vouchers/test_vouchers_batch.py``) proves it on
SQLite; on PostgreSQL the batch path has lookups (LATERAL probes) and writes
(COPY) of its own, so the same property (``tests/support/vouchers_books.py``)
runs here on two real databases, emptied between examples.
"""

import pytest
from hypothesis import given
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from services.common.db import make_engine
from services.common.migrations import upgrade
from services.vouchers.rules import parse_rules
from tests.support.vouchers_books import (
    check_batches_book_like_one_by_one,
    check_correction_redelivered_without_correction_of,
    cuts,
    funded_books,
    ledger_examples,
    steps,
    stream_of,
)
from tests.support.vouchers_data import CITY_RULES

pytestmark = pytest.mark.integration

RULES = parse_rules(CITY_RULES, "testcity.yaml")
TABLES = (
    "ledger_entries, redemptions, rejected_usage, outbox, vouchers, "
    "applications, programs"
)


@pytest.fixture
def databases(pg_url_factory):
    engines = []
    for hint in ("one", "batch"):
        url = pg_url_factory(f"vouchers_{hint}")
        upgrade("vouchers", url)
        engines.append(make_engine(url))
    yield [sessionmaker(engine, expire_on_commit=False) for engine in engines]
    for engine in engines:
        engine.dispose()


def _fresh(factory):
    session = factory()
    session.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    session.commit()
    _engine, session, codes = funded_books(RULES, session)
    return session, codes


@ledger_examples(40)
@given(steps, cuts)
def test_batches_book_like_one_by_one_on_postgresql(databases, history, sizes):
    stream = stream_of(history)
    one, one_codes = _fresh(databases[0])
    batch, batch_codes = _fresh(databases[1])
    try:
        check_batches_book_like_one_by_one(
            RULES, stream, sizes, (one, one_codes), (batch, batch_codes)
        )
    finally:
        one.close()
        batch.close()


def test_a_correction_redelivered_without_correction_of_on_postgresql(databases):
    session, codes = _fresh(databases[1])
    try:
        check_correction_redelivered_without_correction_of(session, RULES, codes)
    finally:
        session.close()
