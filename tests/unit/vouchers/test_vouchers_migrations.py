"""The hand-written migration builds exactly the tables of models.py."""

import threading

from sqlalchemy.orm import sessionmaker

from services.common.db import make_engine
from services.common.migrations import upgrade
from services.vouchers import domain, ledger
from services.vouchers.models import Base
from tests.support.schema import schema_drift
from tests.support.vouchers_books import consent
from tests.support.vouchers_data import company, usage


def test_migration_matches_models(sqlite_url):
    upgrade("vouchers", sqlite_url)
    upgrade("vouchers", sqlite_url)  # idempotent on restart
    engine = make_engine(sqlite_url)
    diff = schema_drift(engine, Base.metadata, "vouchers")
    engine.dispose()
    assert diff == []


def test_concurrent_bookings_on_sqlite_lose_nothing(sqlite_url, city_rules):
    upgrade("vouchers", sqlite_url)
    engine = make_engine(sqlite_url)
    factory = sessionmaker(engine, expire_on_commit=False)
    session = factory()
    ledger.sync_programs(session, city_rules)
    program = city_rules.program("tc-compute")
    applicant = company()
    code = ledger.apply(
        session,
        city_rules,
        program,
        applicant,
        1000_00,
        domain.decide(program, applicant),
    ).voucher.code
    consent(session, city_rules, code)
    session.close()
    errors = []

    def worker():
        own = factory()
        try:
            for _ in range(10):
                ledger.book_usage(own, city_rules, usage(code, 1_000))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    session = factory()
    voucher, lines, total = ledger.get_voucher(session, code)
    assert total == 60 and voucher.redeemed_fen == 60 * 800
    assert ledger.check_ledger(session) == []
    session.close()
    engine.dispose()
