"""A monthly statement as the city's service answers it, made by the real
ledger on SQLite (issue 17), for the portal's tests of its JSON, CSV and PDF:
the figures a test then finds in a PDF are the ledger's, not made up.
"""

from __future__ import annotations

from typing import Any

from services.common.errors import NotFound
from services.common.units import month_of, utcnow
from services.vouchers import ledger
from services.vouchers.rules import parse_rules
from services.vouchers.schemas import MonthlyStatementSchema
from tests.support.vouchers_books import issue
from tests.support.vouchers_data import CITY_RULES, make_session_factory, usage

CITY = "testcity"  # CITY_RULES's, with voucher prefix TC


FACE_FEN = 1000_00


def ledger_statement(
    jobs: int = 2, cost_fen: int = 12_345, **usage_overrides: Any
) -> dict[str, Any]:
    """This month's statement of a new voucher (CNY 1,000.00) that paid for
    ``jobs`` jobs (costing ``cost_fen``, one fen more each), dumped as
    ``monthly_statement`` dumps it."""
    rules = parse_rules(CITY_RULES, "testcity.yaml")
    engine, factory = make_session_factory()
    session = factory()
    try:
        ledger.sync_programs(session, rules)
        code = issue(session, rules, face_fen=FACE_FEN).voucher.code
        ledger.book_usage_batch(
            session,
            rules,
            [usage(code, cost_fen + n, **usage_overrides) for n in range(jobs)],
        )
        found = ledger.monthly_statement(session, rules, code, month_of(utcnow()))
        return MonthlyStatementSchema().dump(found)
    finally:
        session.close()
        engine.dispose()


def serve(rpc, statement: dict[str, Any]) -> None:
    """The fake portal RPC answers for the test city and its voucher."""
    rpc.replies[("city_registry", "voucher_prefixes")] = {"TC": CITY}
    rpc.replies[("city_registry", "list_cities")] = [
        {"code": CITY, "name": "Test City", "status": "live", "voucher_prefix": "TC"}
    ]

    def answer(code, month, company_id=None):
        if company_id not in (None, statement["company_id"]):
            raise NotFound("voucher_not_found", f"no voucher {code}")
        return statement

    rpc.replies[(f"vouchers_{CITY}", "monthly_statement")] = answer
