"""The city's ledger on real PostgreSQL under concurrency, and a SIGKILL mid-stream.

- 32 threads issue against a budget that fits only some vouchers, and 32
  threads redeem on one voucher with every record delivered twice: each thread
  calls the ledger functions on its own PostgreSQL connection (the same code
  the consumer runs; the threads are eventlet-patched, so the interleaving is
  on the database, where the row locks are).
- The service as a real process (``python -m services.vouchers``) killed with
  SIGKILL in the middle of a stream of ``usage_rated`` and started again: every
  record is booked exactly once.
"""

import os
import signal
import subprocess
import threading

import nameko
import pytest
from kombu import Connection
from nameko.standalone.rpc import ClusterRpcClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.common.db import make_engine
from services.common.errors import Conflict
from services.common.migrations import upgrade
from services.common.rpc_access import caller_options
from services.common.units import apply_rate_fen
from services.vouchers import domain, ledger
from services.vouchers.models import Program, Redemption, Voucher
from services.vouchers.rules import parse_rules
from tests.support import bus
from tests.support.bus import wait_acked
from tests.support.polling import eventually
from tests.support.processes import start_service
from tests.support.vouchers_books import consent, consent_by_rpc
from tests.support.vouchers_data import EAST_COMMERCIAL as COMMERCIAL
from tests.support.vouchers_data import (
    application,
    credit_code,
    publish_usage_rated,
    rated,
)

pytestmark = pytest.mark.integration

RULES = parse_rules(
    b"""
city: shanghai
name: Shanghai
region: east
voucher_prefix: SH
programs:
  - id: sh-small
    kind: compute
    budget_cny: 10000
    rate_percent: 80
    face_value_cny: {min: 700, max: 1000}
    valid_days: 30
""",
    "small.yaml",
)


@pytest.fixture
def pg_factory(pg_url_factory):
    url = pg_url_factory("vouchers")
    upgrade("vouchers", url)
    engine = make_engine(url, pool_size=40, max_overflow=0)
    factory = sessionmaker(engine, expire_on_commit=False)
    session = factory()
    ledger.sync_programs(session, RULES)
    session.close()
    yield factory
    engine.dispose()


def _race(pg_factory, count: int, work) -> list[Exception]:
    """``work(n, session)`` in ``count`` threads, each on its own session, all
    released at once; the exceptions they raised (none is expected)."""
    errors: list[Exception] = []
    start = threading.Barrier(count)

    def run(n):
        session = pg_factory()
        try:
            start.wait()
            work(n, session)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_32_concurrent_issuers_against_a_small_budget(pg_factory):
    program = RULES.program("sh-small")
    issued, refused = [], []

    def issuer(n, session):
        company = application()["company"] | {"registration_id": credit_code(1_000 + n)}
        company["registered_in"] = "shanghai"
        try:
            result = ledger.apply(
                session,
                RULES,
                program,
                company,
                (700 + 10 * n) * 100,
                domain.decide(program, company),
            )
            issued.append(result.voucher.face_value_fen)
        except Conflict as exc:
            refused.append(exc.code)

    assert _race(pg_factory, 32, issuer) == []
    assert len(issued) + len(refused) == 32
    assert set(refused) == {"budget_exhausted"} and 9 <= len(issued) <= 14
    session = pg_factory()
    row = session.get(Program, "sh-small")
    assert row.committed_fen == sum(issued)  # an independent sum
    assert row.available_fen == 10_000_00 - sum(issued) >= 0
    assert row.available_fen < 700_00 + 10 * 31 * 100  # the refusals were right
    assert ledger.check_ledger(session) == []
    session.close()


def test_32_concurrent_redeemers_on_one_voucher_with_redelivery(pg_factory):
    program = RULES.program("sh-small")
    session = pg_factory()
    company = application()["company"]
    code = ledger.apply(
        session, RULES, program, company, 1000_00, domain.decide(program, company)
    ).voucher.code
    consent(session, RULES, code)
    session.close()
    # 32 × 5 records of 1 000 fen cost (800 subsidy): 128 000 > the 100 000
    # face value, so the balance runs out in the middle; each record twice.
    records = [
        rated(code, f"t{t}-r{i}", 1_000, COMMERCIAL) | {"event_id": f"e-{t}-{i}"}
        for t in range(32)
        for i in range(5)
    ]
    from services.common.contracts import load_event

    loaded = [load_event("usage_rated", r) for r in records]

    def redeemer(t, own):
        mine = loaded[t * 5 : t * 5 + 5]
        neighbour = loaded[((t + 1) % 32) * 5 : ((t + 1) % 32) * 5 + 5]
        for record in mine + neighbour:  # every record delivered twice
            ledger.book_usage(own, RULES, record)

    assert _race(pg_factory, 32, redeemer) == []
    session = pg_factory()
    rows = session.scalars(select(Redemption)).all()
    assert len(rows) == 160  # each record once
    # Independent computation: bookings in some order, each min(800, balance).
    assert sum(r.subsidy_fen for r in rows) == min(
        160 * apply_rate_fen(1000, 8000), 1000_00
    )
    voucher = session.get(Voucher, code)
    assert voucher.redeemed_fen == 1000_00 and voucher.balance_fen == 0
    assert ledger.check_ledger(session) == []
    session.close()


def test_concurrent_batches_on_shared_vouchers_with_redelivery(pg_factory):
    """The consumer's path: 16 threads book overlapping batches (every record
    in two batches, on three shared vouchers, two of them running out) in one
    transaction each; the row locks and the unique keys keep every record
    booked once and the books balanced."""
    program = RULES.program("sh-small")
    session = pg_factory()
    codes = []
    for n, face in enumerate((1000_00, 1000_00, 800_00)):
        company = application()["company"] | {"registration_id": credit_code(2_000 + n)}
        decision = domain.decide(program, company)
        codes.append(
            ledger.apply(session, RULES, program, company, face, decision).voucher.code
        )
        consent(session, RULES, codes[-1])
    session.close()
    from services.common.contracts import load_event

    # 16 × 10 records, 3 000 fen cost each (2 400 subsidy): 32 on the first
    # voucher (76 800 fen, it lasts), 64 on each of the others (they run out).
    records = [
        load_event(
            "usage_rated",
            rated(
                codes[0 if i < 2 else 1 + (t + i) % 2],
                f"bt{t}-r{i}",
                3_000,
                COMMERCIAL,
            )
            | {"event_id": f"be-{t}-{i}"},
        )
        for t in range(16)
        for i in range(10)
    ]

    def consumer(t, own):
        mine = records[t * 10 : t * 10 + 10]
        theirs = records[((t + 1) % 16) * 10 : ((t + 1) % 16) * 10 + 10]
        ledger.book_usage_batch(own, RULES, mine + theirs[:5])
        ledger.book_usage_batch(own, RULES, theirs[5:] + mine[:3])

    errors = _race(pg_factory, 16, consumer)
    assert errors == []
    session = pg_factory()
    rows = session.scalars(select(Redemption)).all()
    assert len(rows) == 160 and len({r.record_id for r in rows}) == 160
    per_voucher = {code: 0 for code in codes}
    for row in rows:
        per_voucher[row.voucher_code] += row.subsidy_fen
    for code, face in zip(codes, (1000_00, 1000_00, 800_00), strict=True):
        count = sum(1 for r in records if r["voucher_code"] == code)
        # Independent computation: each record min(2 400, what is left).
        assert per_voucher[code] == min(count * 2_400, face)
        voucher = session.get(Voucher, code)
        assert voucher.redeemed_fen == per_voucher[code]
    assert ledger.check_ledger(session) == []
    session.close()


def _start(env):
    return start_service(
        "vouchers", env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_sigkill_mid_stream_then_restart_books_every_record_once(
    rabbit_config, pg_url_factory
):
    url = pg_url_factory("vouchers")
    uri = nameko.config["AMQP_URI"]
    env = dict(
        os.environ,
        CITY_CODE="shanghai",
        DATABASE_URL=url,
        AMQP_URI=uri,
        HEARTBEAT_INTERVAL_S="1",
        LOG_LEVEL="WARNING",
    )
    with Connection(uri) as connection:
        bus.registry_queue(connection)  # the city's events reach the registry's
    process = _start(env)
    try:
        with ClusterRpcClient(uri=uri, timeout=10, **caller_options(uri)) as rpc:
            city = rpc.vouchers_shanghai
            eventually(
                lambda: city.program_states() is not None,
                30,
                "the city to start",
                ignoring=(Exception,),  # not up yet
            )
            code = city.apply(application())["voucher"]["code"]
            consent_by_rpc(city, url, code)
        total = 3_000  # long enough that the kill lands mid-stream
        with Connection(uri) as connection:
            publish_usage_rated(
                connection,
                *(rated(code, f"k{i}", 1_000, COMMERCIAL) for i in range(total)),
            )
        engine = make_engine(url)

        def booked():
            with Session(engine) as session:
                return session.scalar(select(func.count()).select_from(Redemption))

        eventually(lambda: booked() >= 50, 30, "some bookings")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        killed_at = booked()
        assert killed_at < total, "the stream finished before the kill"
        process = _start(env)
        eventually(lambda: booked() == total, 60, f"all {total} bookings")
        # Every delivery acked (the killed process's went back to the queue):
        # a record booked twice would show now.
        wait_acked(uri, "vouchers_shanghai.usage_rated", total)
        with Session(engine) as session:
            assert booked() == total
            ids = session.scalars(select(Redemption.record_id)).all()
            assert len(set(ids)) == total
            voucher = session.get(Voucher, code)
            assert voucher.redeemed_fen == total * 800
            assert ledger.check_ledger(session) == []
        engine.dispose()
    finally:
        process.kill()
        process.wait(10)
