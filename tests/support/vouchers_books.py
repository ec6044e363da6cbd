"""The books of the test city on a session, and the property that booking a
batch equals booking its records one by one: shared by the unit test on
SQLite (tests/unit/vouchers/test_vouchers_batch.py) and the integration test
on PostgreSQL (tests/integration/test_vouchers_batch_postgres.py).

A stream is a list of abstract records ``(record_id, voucher index, cost,
where, correction_of)``; :func:`record` makes each the event the ledger
receives, on the voucher codes of one books.
"""

from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.common.db import make_engine
from services.common.units import utcnow
from services.vouchers import domain, ledger
from services.vouchers.ledger import bindings
from services.vouchers.models import (
    Binding,
    Program,
    Redemption,
    RejectedUsage,
    Voucher,
)
from tests.support.vouchers_data import (
    EAST_COMMERCIAL,
    WEST_GOVERNMENT,
    company,
    make_session_factory,
    usage,
)


def ledger_examples(count: int) -> settings:
    """Hypothesis settings of a ledger property: ``count`` examples, no deadline
    (a database is slow at times), and every example builds its own books (so
    function-scoped fixtures are fine)."""
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
        ],
    )


# The (data centre, tenant) pairs the test data bills (vouchers_data.usage and
# rated): their holders authorise them (DESIGN.md §9) unless a test says not.
TEST_TENANTS = (("dc-a", "tenant-1"), ("dc-test-01", "tenant-1"))
HOLDER = "company: test holder consent"


def consent(
    session, rules, code, tenants=TEST_TENANTS, ago=timedelta(days=1), actor=HOLDER
):
    """The holder of ``code`` authorises ``tenants`` (by the ledger's own
    path); then the voucher's issue and those authorisations are dated
    ``ago`` back (:func:`date_back`). ``ago=None`` keeps the real moments."""
    for datacenter_id, tenant_id in tenants:
        bindings.authorise(session, rules, code, datacenter_id, tenant_id, actor)
    if ago is not None:
        date_back(session, code, ago)


def consent_by_rpc(
    city, database_url, code, tenants=TEST_TENANTS, ago=timedelta(days=1)
):
    """:func:`consent` for a running city: its ``authorise_binding`` RPC (what
    the portal calls for the holder), then :func:`date_back` in its database."""
    for datacenter_id, tenant_id in tenants:
        city.authorise_binding(code, datacenter_id, tenant_id, HOLDER)
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            date_back(session, code, ago)
    finally:
        engine.dispose()


def date_back(session, code, ago):
    """Date the voucher's issue and every authorisation on it ``ago`` back,
    so that the test data's records (of the last hours) started after both."""
    then = utcnow() - ago
    session.execute(update(Voucher).where(Voucher.code == code).values(issued_at=then))
    session.execute(
        update(Binding)
        .where(Binding.voucher_code == code, Binding.authorised_at.is_not(None))
        .values(authorised_at=then)
    )
    session.commit()


def issue(
    session,
    rules,
    program_id="tc-compute",
    face_fen=1000_00,
    *,
    tenants=TEST_TENANTS,
    **overrides,
):
    """A voucher of ``program_id`` for a new company (``ledger.apply``'s
    result), the test tenants authorised on it (:func:`consent`) when it is
    issued at once; ``tenants=()`` for none."""
    program = rules.program(program_id)
    applicant = company(**overrides)
    decision = domain.decide(program, applicant)
    result = ledger.apply(session, rules, program, applicant, face_fen, decision)
    if result.voucher is not None and tenants:
        consent(session, rules, result.voucher.code, tenants)
    return result


def program_row(session, program_id="tc-compute"):
    """The program's row as committed now."""
    row = session.get(Program, program_id, populate_existing=True)
    session.rollback()
    return row


# Vouchers: two of tc-compute (one small), one of tc-west (west data centres
# only), and one code that does not exist.
VOUCHERS = [("tc-compute", 1000_00), ("tc-compute", 150_00), ("tc-west", 500_00)]
UNKNOWN = len(VOUCHERS)

new = st.tuples(
    st.just("new"),
    st.integers(0, UNKNOWN),  # which voucher
    st.integers(0, 40_000),  # cost in fen
    st.sampled_from(["east", "west"]),
)
again = st.tuples(st.just("again"), st.integers(0, 1000))
correct = st.tuples(st.just("correct"), st.integers(0, 1000), st.integers(0, 40_000))
# A correction of a pooled record, which may come later (or never).
ahead = st.tuples(
    st.just("ahead"), st.integers(0, 2), st.integers(0, 40_000), st.integers(0, 2)
)
pooled = st.tuples(st.just("pooled"), st.integers(0, 2), st.integers(0, 40_000))
# Corrections are rare, so that most batches take the bulk path (a batch with
# a correction in it books record by record).
steps = st.lists(
    st.one_of(new, new, new, new, again, again, pooled, pooled, correct, ahead),
    max_size=40,
)
cuts = st.lists(st.integers(1, 8), min_size=1, max_size=40)


def stream_of(history):
    """Abstract records: (record_id, voucher index, cost, where, correction_of)."""
    records = []
    for n, step in enumerate(history):
        if step[0] == "new":
            records.append((f"r{n}", step[1], step[2], step[3], None))
        elif records and step[0] == "again":
            records.append(records[step[1] % len(records)])
        elif records and step[0] == "correct":
            earlier = records[step[1] % len(records)]
            records.append((f"r{n}", earlier[1], step[2], earlier[3], earlier[0]))
        elif step[0] == "ahead":
            records.append((f"r{n}", step[1], step[2], "east", f"p{step[3]}"))
        elif step[0] == "pooled":
            records.append((f"p{step[1]}", 0, step[2], "east", None))
    return records


def funded_books(city_rules, session=None):
    """A funded city with the VOUCHERS issued, on ``session`` (or on a new
    SQLite database, whose engine comes back first)."""
    engine = None
    if session is None:
        engine, factory = make_session_factory()
        session = factory()
    ledger.sync_programs(session, city_rules)
    codes = []
    for n, (program_id, face) in enumerate(VOUCHERS):
        program = city_rules.program(program_id)
        applicant = company(registration_id=f"co-{n}")
        decision = domain.decide(program, applicant)
        code = ledger.apply(
            session, city_rules, program, applicant, face, decision
        ).voucher.code
        consent(session, city_rules, code)
        codes.append(code)
    codes.append("TC-AAAAAAAAAAAA-0")
    return engine, session, codes


def record(abstract, codes):
    """The loaded ``usage_rated`` event of an abstract record on ``codes``."""
    record_id, voucher, cost, where, correction_of = abstract
    return usage(
        codes[voucher],
        cost,
        WEST_GOVERNMENT if where == "west" else EAST_COMMERCIAL,
        event_id=f"ev-{record_id}",
        record_id=record_id,
        correction_of=correction_of,
    )


def state(session, codes):
    """The books, with voucher codes replaced by their index."""
    index = {code: n for n, code in enumerate(codes)}
    redemptions = sorted(
        (r.record_id, r.kind, r.source_record_id, index[r.voucher_code], r.subsidy_fen)
        for r in session.scalars(select(Redemption))
    )
    rejected = sorted(
        (r.record_id, r.reason) for r in session.scalars(select(RejectedUsage))
    )
    vouchers = sorted(
        (index[v.code], v.redeemed_fen, v.released_fen)
        for v in session.scalars(select(Voucher))
    )
    programs = sorted(
        (p.id, p.available_fen, p.committed_fen, p.redeemed_fen)
        for p in session.scalars(select(Program))
    )
    session.rollback()
    return redemptions, rejected, vouchers, programs


def summary(outcome, codes):
    index = {code: n for n, code in enumerate(codes)}
    return (
        sorted(
            (r.event_id, r.record_id, index[r.voucher_code], r.subsidy_fen)
            for r in outcome.redemptions
        ),
        outcome.rejected,
    )


def check_batches_book_like_one_by_one(rules, stream, sizes, one_by_one, batched):
    """Book ``stream`` one record at a time into one books and in batches of
    ``sizes`` (cycled) into the other: same outcomes, same state, sound ledger."""
    one, one_codes = one_by_one
    batch, batch_codes = batched
    expected = [
        summary(ledger.book_usage(one, rules, record(r, one_codes)), one_codes)
        for r in stream
    ]
    got, start, n = [], 0, 0
    while start < len(stream):
        size = sizes[n % len(sizes)]
        chunk = [record(r, batch_codes) for r in stream[start : start + size]]
        got += [
            summary(outcome, batch_codes)
            for outcome in ledger.book_usage_batch(batch, rules, chunk)
        ]
        start, n = start + size, n + 1
    # The event ids do not depend on the voucher code: compare them too.
    assert got == expected
    assert state(batch, batch_codes) == state(one, one_codes)
    assert ledger.check_ledger(batch) == []


def check_correction_redelivered_without_correction_of(session, rules, codes):
    """A correction that comes again without its correction_of (a body that
    conflicts) is a duplicate: the batch gives back every row it wrote, the
    reversal too, as booking it alone does."""
    original = record(("o1", 0, 4_000, "east", None), codes)
    correction = record(("c1", 0, 2_000, "east", "o1"), codes)
    ledger.book_usage_batch(session, rules, [original])
    ledger.book_usage_batch(session, rules, [correction])
    again = dict(correction, correction_of=None)
    [batch] = ledger.book_usage_batch(session, rules, [again])
    single = ledger.book_usage(session, rules, again)
    assert batch.duplicate
    assert [r.kind for r in batch.redemptions] == [ledger.REVERSAL, ledger.USAGE]
    assert summary(batch, codes) == summary(single, codes)
    assert ledger.check_ledger(session) == []
