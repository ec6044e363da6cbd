"""Booking a batch in one transaction equals booking its records one by one.

``ledger.book_usage_batch`` is the consumer's path; ``ledger.book_usage`` is
the reference. For any stream of records (new ones, redeliveries, the same
record twice in one batch, unknown vouchers, excluded data centres,
corrections, balances running out) cut into any batches, both give the same
outcome per record and the same books.
"""

from hypothesis import given

from services.vouchers import domain, ledger
from tests.support.vouchers_books import (
    UNKNOWN,
    check_batches_book_like_one_by_one,
    check_correction_redelivered_without_correction_of,
    cuts,
    funded_books,
    ledger_examples,
    record,
    steps,
    stream_of,
    summary,
)


@ledger_examples(120)
@given(steps, cuts)
def test_batches_book_like_one_by_one(city_rules, history, sizes):
    stream = stream_of(history)
    one_engine, one, one_codes = funded_books(city_rules)
    batch_engine, batch, batch_codes = funded_books(city_rules)
    try:
        check_batches_book_like_one_by_one(
            city_rules, stream, sizes, (one, one_codes), (batch, batch_codes)
        )
    finally:
        for session, engine in ((one, one_engine), (batch, batch_engine)):
            session.close()
            engine.dispose()


def test_a_batch_redelivered_books_nothing_new(city_rules):
    """The same batch twice: the second returns the same rows, as duplicates."""
    rules = city_rules
    engine, session, codes = funded_books(rules)
    try:
        chunk = [record((f"x{i}", 1, 4_000, "east", None), codes) for i in range(6)] + [
            record(("x-unknown", UNKNOWN, 100, "east", None), codes)
        ]
        first = ledger.book_usage_batch(session, rules, chunk)
        again = ledger.book_usage_batch(session, rules, chunk)
        # 150 CNY voucher, 3 200 fen each: the fifth gets what is left.
        assert [o.redemptions[0].subsidy_fen for o in first[:6]] == [
            3_200,
            3_200,
            3_200,
            3_200,
            2_200,
            0,
        ]
        assert first[6].rejected == domain.UNKNOWN_VOUCHER
        assert all(o.duplicate for o in again)
        assert [summary(o, codes) for o in again] == [summary(o, codes) for o in first]
        assert ledger.check_ledger(session) == []
    finally:
        session.close()
        engine.dispose()


def test_a_record_whose_correction_came_first_is_superseded(city_rules):
    engine, session, codes = funded_books(city_rules)
    try:
        correction = record(("fix", 0, 1_000, "east", "orig"), codes)
        original = record(("orig", 0, 5_000, "east", None), codes)
        other = record(("other", 0, 1_000, "east", None), codes)
        ledger.book_usage_batch(session, city_rules, [correction])
        late = ledger.book_usage_batch(session, city_rules, [original, other])
        assert late[0].rejected == domain.SUPERSEDED
        assert [r.subsidy_fen for r in late[1].redemptions] == [800]
        assert ledger.check_ledger(session) == []
    finally:
        session.close()
        engine.dispose()


def test_a_correction_redelivered_without_correction_of(city_rules):
    engine, session, codes = funded_books(city_rules)
    try:
        check_correction_redelivered_without_correction_of(session, city_rules, codes)
    finally:
        session.close()
        engine.dispose()
