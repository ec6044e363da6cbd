"""The ledger on SQLite: issue, book once, correct, reject, and always balance."""

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from services.common import vouchercode
from services.common.errors import Conflict
from services.vouchers import domain, ledger
from services.vouchers.models import LedgerEntry, RejectedUsage, Voucher
from tests.support.vouchers_books import issue, program_row
from tests.support.vouchers_data import (
    EAST_COMMERCIAL,
    WEST_GOVERNMENT,
    usage,
)


def test_programs_are_funded_once(books, city_rules):
    ledger.sync_programs(books, city_rules)  # a restart
    row = program_row(books)
    assert (row.budget_fen, row.available_fen, row.committed_fen) == (
        10_000_00,
        10_000_00,
        0,
    )
    assert ledger.check_ledger(books) == []


def test_issue_commits_face_value(books, city_rules):
    result = issue(books, city_rules, tenants=())
    voucher = result.voucher
    assert result.application.decision == "approved"
    assert vouchercode.parse(voucher.code) == "TC"
    assert voucher.expires_at - voucher.issued_at == timedelta(days=30)
    row = program_row(books)
    assert (row.available_fen, row.committed_fen) == (9_000_00, 1_000_00)
    assert ledger.check_ledger(books) == []


def test_rejected_application_is_stored_without_voucher(books, city_rules):
    result = issue(books, city_rules, registered_in="elsewhere")
    assert result.voucher is None and result.application.decision == "rejected"
    assert result.application.reasons[1] == {
        "rule": "registered_in: testcity",
        "passed": False,
        "evidence": "registered_in=elsewhere",
    }
    assert program_row(books).committed_fen == 0


def test_one_active_voucher_per_company_and_program(books, city_rules):
    first = issue(books, city_rules)
    company_id = first.application.company_id
    with pytest.raises(Conflict) as err:
        issue(books, city_rules, registration_id=company_id)
    assert err.value.code == "active_voucher_exists"
    # Another program is fine.
    assert issue(books, city_rules, "tc-west", registration_id=company_id).voucher


def test_budget_exhausted(books, city_rules):
    for _ in range(10):
        issue(books, city_rules)
    with pytest.raises(Conflict) as err:
        issue(books, city_rules, face_fen=100_00)
    assert err.value.code == "budget_exhausted"
    assert program_row(books).available_fen == 0
    assert ledger.check_ledger(books) == []


def test_booking_once_and_redelivery(books, city_rules):
    code = issue(books, city_rules).voucher.code
    record = usage(code, 10_000)
    first = ledger.book_usage(books, city_rules, record)
    again = ledger.book_usage(books, city_rules, record)
    assert [r.subsidy_fen for r in first.redemptions] == [8_000]
    assert again.duplicate and [r.event_id for r in again.redemptions] == [
        r.event_id for r in first.redemptions
    ]
    voucher = books.get(Voucher, code, populate_existing=True)
    assert voucher.balance_fen == 1000_00 - 8_000
    row = program_row(books)
    assert (row.committed_fen, row.redeemed_fen) == (1000_00 - 8_000, 8_000)
    assert ledger.check_ledger(books) == []


def test_bonus_at_government_data_centre(books, city_rules):
    code = issue(books, city_rules).voucher.code
    outcome = ledger.book_usage(books, city_rules, usage(code, 10_000, WEST_GOVERNMENT))
    assert outcome.redemptions[0].subsidy_fen == 9_000  # capped at 90 %


def test_subsidy_never_exceeds_balance(books, city_rules):
    code = issue(books, city_rules, face_fen=100_00).voucher.code
    outcome = ledger.book_usage(books, city_rules, usage(code, 1_000_000))
    assert outcome.redemptions[0].subsidy_fen == 100_00
    outcome = ledger.book_usage(books, city_rules, usage(code, 1_000_000))
    assert outcome.redemptions[0].subsidy_fen == 0
    assert ledger.check_ledger(books) == []


def test_correction_reverses_and_rebooks(books, city_rules):
    code = issue(books, city_rules).voucher.code
    original = usage(code, 10_000)
    ledger.book_usage(books, city_rules, original)
    fixed = usage(code, 5_000, correction_of=original["record_id"])
    outcome = ledger.book_usage(books, city_rules, fixed)
    assert [(r.kind, r.record_id, r.subsidy_fen) for r in outcome.redemptions] == [
        ("reversal", original["record_id"], -8_000),
        ("usage", fixed["record_id"], 4_000),
    ]
    assert books.get(Voucher, code, populate_existing=True).redeemed_fen == 4_000
    # Redelivered: same rows, same events, nothing changes.
    again = ledger.book_usage(books, city_rules, fixed)
    assert [r.event_id for r in again.redemptions] == [
        r.event_id for r in outcome.redemptions
    ]
    assert program_row(books).redeemed_fen == 4_000
    # A second correction of the same record does not reverse it twice.
    twice = ledger.book_usage(
        books, city_rules, usage(code, 5_000, correction_of=original["record_id"])
    )
    assert [r.kind for r in twice.redemptions] == ["usage"]
    assert ledger.check_ledger(books) == []


def test_correction_arriving_first_supersedes_the_original(books, city_rules):
    code = issue(books, city_rules).voucher.code
    fixed = usage(code, 5_000, correction_of="late-record")
    ledger.book_usage(books, city_rules, fixed)
    late = ledger.book_usage(
        books, city_rules, usage(code, 10_000, record_id="late-record")
    )
    assert late.rejected == domain.SUPERSEDED and not late.redemptions


@pytest.mark.parametrize(
    "program_id, voucher, datacenter, expires, reason",
    [
        ("tc-compute", "TC-AAAAAAAAAAAA-0", EAST_COMMERCIAL, False, "unknown_voucher"),
        ("tc-compute", None, EAST_COMMERCIAL, False, "unknown_voucher"),
        ("tc-compute", "issued", EAST_COMMERCIAL, True, "voucher_expired"),
        ("tc-west", "issued", EAST_COMMERCIAL, False, "voucher_wrong_datacenter"),
    ],
)
def test_unbookable_records_are_stored_with_a_reason(
    books, city_rules, program_id, voucher, datacenter, expires, reason
):
    code = issue(books, city_rules, program_id).voucher.code
    if voucher == "issued":
        voucher = code
    if expires:
        # It expired before the usage started.
        issued = books.get(Voucher, code)
        issued.expires_at = issued.issued_at - timedelta(hours=3)
        books.commit()
    record = usage(voucher, 10_000, datacenter)
    outcome = ledger.book_usage(books, city_rules, record)
    assert outcome.rejected == reason and not outcome.redemptions
    assert ledger.book_usage(books, city_rules, record).duplicate
    rows = books.scalars(select(RejectedUsage)).all()
    assert [(r.record_id, r.reason) for r in rows] == [(record["record_id"], reason)]
    assert program_row(books, program_id).redeemed_fen == 0


def test_check_ledger_names_drift(books, city_rules):
    code = issue(books, city_rules).voucher.code
    books.execute(update(Voucher).values(redeemed_fen=1))
    books.add(
        LedgerEntry(
            account="program:tc-compute:available",
            amount_fen=5,
            reference="tamper",
            created_at=books.get(Voucher, code).issued_at,
        )
    )
    books.commit()
    problems = ledger.check_ledger(books)
    assert f"voucher {code}: redeemed 1 but ledger says 0" in problems
    assert "program tc-compute: available 900000 but ledger says 900005" in problems
