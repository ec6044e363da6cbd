"""A voucher's redemption lines (``list_redemptions``) on SQLite: every line
the ledger has, booked, clawed back and refused, in pages that add up."""

import pytest

from services.common.errors import InvalidRequest, NotFound
from services.vouchers import ledger, schemas
from tests.support.vouchers_books import issue
from tests.support.vouchers_data import usage


@pytest.fixture
def lines_of(books, city_rules):
    """A voucher with three bookings, one of them corrected (reversed and
    booked again), then revoked and sent one more record (refused)."""
    code = issue(books, city_rules).voucher.code
    first, *others = [usage(code, 10_000) for _ in range(3)]
    for record in (first, *others):
        ledger.book_usage(books, city_rules, record)
    fixed = usage(code, 5_000, correction_of=first["record_id"])
    ledger.book_usage(books, city_rules, fixed)
    ledger.revoke(books, city_rules, code, "wrong tenant", "admin")
    late = usage(code, 10_000)
    ledger.book_usage(books, city_rules, late)
    return code, first, fixed, late


def test_every_line_with_its_status_oldest_first(books, lines_of):
    code, first, fixed, late = lines_of
    voucher, items, total = ledger.list_redemptions(books, code, 100, 0)
    assert voucher.code == code and total == len(items) == 6
    statuses = [(i["record_id"], i["status"]) for i in items]
    assert statuses[0] == (first["record_id"], "booked")
    assert (first["record_id"], "clawed_back") in statuses
    assert (fixed["record_id"], "booked") in statuses
    assert statuses[-1] == (late["record_id"], "refused")
    reversal = next(i for i in items if i["status"] == "clawed_back")
    assert reversal["subsidy_fen"] == -items[0]["subsidy_fen"] < 0
    refused = items[-1]
    assert (refused["gpu_seconds"], refused["subsidy_fen"]) == (None, None)
    assert refused["reason"] == "voucher_revoked"


@pytest.mark.parametrize("limit", [1, 2, 4, 5])
def test_pages_add_up_to_the_whole_without_repeats_or_gaps(books, lines_of, limit):
    code = lines_of[0]
    _, whole, total = ledger.list_redemptions(books, code, 1000, 0)
    paged = []
    for offset in range(0, total + limit, limit):
        _, items, page_total = ledger.list_redemptions(books, code, limit, offset)
        assert page_total == total and len(items) == min(limit, max(total - offset, 0))
        paged += items
    assert paged == whole


@pytest.mark.parametrize("limit, offset", [(0, 0), (1001, 0), (10, -1), ("5", 0)])
def test_a_bad_page_is_refused(books, lines_of, limit, offset):
    with pytest.raises(InvalidRequest):
        ledger.list_redemptions(books, lines_of[0], limit, offset)


def test_an_unknown_voucher_is_not_found(books):
    with pytest.raises(NotFound):
        ledger.list_redemptions(books, "TC-AAAAAAAAAAAA-0", 10, 0)


def test_a_line_dumps_the_contract_fields(books, lines_of):
    _, items, _ = ledger.list_redemptions(books, lines_of[0], 1, 0)
    body = schemas.RedemptionLineSchema().dump(items[0])
    assert {
        "record_id",
        "datacenter_id",
        "tenant_id",
        "started_at",
        "ended_at",
        "gpu_seconds",
        "cost_fen",
        "subsidy_fen",
        "status",
    } <= set(body)
    assert body["status"] == "booked" and body["tenant_id"] == "tenant-1"
    assert body["booked_at"].endswith("Z") and body["started_at"].endswith("Z")
    assert body["started_at"] < body["ended_at"]
