"""Consent and time (DESIGN.md §9, invariant 9) without a broker: the rules
(``domain``), the rules file's ``grace_days``, and the bindings on the books
of an SQLite ledger — a data centre asks, only the holder authorises, and
only an authorised tenant's records from the moment of authorisation are
subsidised; late usage of a job that ended by expiry is booked in the grace
period, and the balance released after it."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from services.common.errors import Conflict, NotFound
from services.common.units import utcnow
from services.vouchers import domain, ledger
from services.vouchers.ledger import bindings
from services.vouchers.models import Binding, BindingChange, Voucher
from services.vouchers.rules import RulesError, parse_rules
from tests.support.vouchers_books import consent, issue
from tests.support.vouchers_data import MINIMAL_RULES, usage

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
SECOND = timedelta(seconds=1)


def _problem(started_at, *, expires_at=T0 + 30 * 24 * HOUR, program=None, **times):
    """An active voucher issued at T0, its tenant authorised at T0 + 1 h."""
    times = {
        "ended_at": started_at + HOUR,
        "issued_at": T0,
        "authorised_at": T0 + HOUR,
        **times,
    }
    times.setdefault("now", times["ended_at"] + SECOND)
    return domain.usage_problem(
        program, domain.ACTIVE, expires_at, started_at, "dc-a", {}, **times
    )


# -------------------------------------------------------------- the rules


def test_a_tenant_not_authorised_is_refused():
    assert _problem(T0 + 2 * HOUR, authorised_at=None) == "tenant_not_authorised"
    assert _problem(T0 + 2 * HOUR) is None


def test_usage_from_the_moment_of_authorisation_and_not_before():
    assert _problem(T0 + HOUR) is None
    assert _problem(T0 + HOUR - SECOND) == "before_authorisation"


def test_usage_that_started_before_the_voucher_was_issued_is_refused():
    assert _problem(T0 - SECOND, authorised_at=T0 - HOUR) == "before_authorisation"
    # Whether or not the tenant is authorised: it could never be subsidised.
    assert _problem(T0 - SECOND, authorised_at=None) == "before_authorisation"
    assert _problem(T0, authorised_at=T0) is None


def test_late_usage_of_time_before_expiry_is_booked_in_the_grace_period():
    expires = T0 + 10 * 24 * HOUR
    program = parse_rules(MINIMAL_RULES.encode()).programs[0]  # 7 days' grace
    ends = expires + timedelta(days=7)
    job = {"expires_at": expires, "program": program, "ended_at": expires}
    start = expires - HOUR

    assert _problem(start, now=expires - SECOND, **job) is None
    assert _problem(start, now=ends - SECOND, **job) is None
    assert _problem(start, now=ends, **job) == "voucher_expired"
    # A job that ran on past expiry is not late usage of time it covered.
    running_on = dict(job, ended_at=expires + SECOND)
    assert _problem(start, now=expires + SECOND, **running_on) == "voucher_expired"
    # Usage that started at or after expiry never is, as before grace.
    assert _problem(expires, now=expires + HOUR, **job) == "voucher_expired"


def test_without_grace_late_usage_is_refused_from_expiry():
    expires = T0 + 10 * 24 * HOUR
    rules = MINIMAL_RULES.replace(
        "valid_days: 365", "valid_days: 365\n    grace_days: 0"
    )
    program = parse_rules(rules.encode()).programs[0]
    job = {"expires_at": expires, "program": program, "ended_at": expires}

    assert _problem(expires - HOUR, now=expires - SECOND, **job) is None
    assert _problem(expires - HOUR, now=expires, **job) == "voucher_expired"


def test_the_timer_closes_a_voucher_when_its_grace_period_ends():
    expires = T0 + 10 * 24 * HOUR
    ends = expires + timedelta(days=7)
    assert not domain.due_to_expire(domain.ACTIVE, expires, 7, ends - SECOND)
    assert domain.due_to_expire(domain.ACTIVE, expires, 7, ends)


@pytest.mark.parametrize(
    ("status", "requested_at", "withdrawn_at", "action", "after"),
    [
        (None, None, None, "request", "requested"),
        ("requested", T0, None, "request", None),  # asked already
        ("authorised", T0, None, "request", None),  # never downgraded
        ("withdrawn", T0, T0 + HOUR, "request", "requested"),  # asked again
        ("withdrawn", T0, T0 + 3 * HOUR, "request", None),  # before the withdrawal
        ("requested", T0, None, "cancel", "withdrawn"),
        ("requested", T0 + 3 * HOUR, None, "cancel", None),  # older than the request
        ("authorised", T0, None, "cancel", None),  # the holder decides
        (None, None, None, "cancel", None),
    ],
)
def test_a_data_centre_only_asks(status, requested_at, withdrawn_at, action, after):
    at = T0 + 2 * HOUR
    assert domain.binding_after(status, requested_at, withdrawn_at, action, at) == (
        after
    )


def test_grace_days_default_to_seven_and_are_bounded():
    assert parse_rules(MINIMAL_RULES.encode()).programs[0].grace_days == 7
    for days in (0, 90):
        text = MINIMAL_RULES.replace(
            "valid_days: 365", f"valid_days: 365\n    grace_days: {days}"
        )
        assert parse_rules(text.encode()).programs[0].grace_days == days
    for bad in ("91", "-1", "'7'", "true", "1.5"):
        text = MINIMAL_RULES.replace(
            "valid_days: 365", f"valid_days: 365\n    grace_days: {bad}"
        )
        with pytest.raises(
            RulesError, match=r"programs\[0\]\.grace_days: must be a whole"
        ):
            parse_rules(text.encode(), "testcity.yaml")


# -------------------------------------------------------------- the books


def _binding(session, code, dc="dc-a", tenant="tenant-1"):
    row = session.get(Binding, (code, dc, tenant), populate_existing=True)
    session.rollback()
    return row


def _fresh(code, cost=1_000, **fields):
    """A record of a job that started a second from now (after every step so far)."""
    start = utcnow() + SECOND
    return usage(code, cost, started_at=start, ended_at=start + HOUR, **fields)


def _steps(session, code):
    rows = session.scalars(
        select(BindingChange).where(BindingChange.voucher_code == code)
    ).all()
    session.rollback()
    return [(r.action, r.status, r.actor) for r in rows]


def _request(code, eid, action="request", at=None, tenant="tenant-1"):
    return {
        "event_id": eid,
        "city": "testcity",
        "occurred_at": utcnow(),
        "voucher_code": code,
        "datacenter_id": "dc-a",
        "tenant_id": tenant,
        "action": action,
        "requested_at": at or utcnow(),
    }


def test_only_the_authorised_tenant_is_subsidised(books, city_rules):
    code = issue(books, city_rules, tenants=[("dc-a", "tenant-1")]).voucher.code

    mine = ledger.book_usage(books, city_rules, usage(code, 10_000))
    other = ledger.book_usage(books, city_rules, usage(code, 10_000, tenant_id="t-2"))
    elsewhere = ledger.book_usage(
        books, city_rules, usage(code, 10_000, datacenter_id="dc-b")
    )

    assert [r.subsidy_fen for r in mine.redemptions] == [8_000]
    assert other.rejected == elsewhere.rejected == "tenant_not_authorised"
    assert ledger.check_ledger(books) == []


def test_the_holder_authorises_once_and_the_city_says_so(books, city_rules):
    code = issue(books, city_rules, tenants=()).voucher.code
    holder = books.get(Voucher, code).company_id
    books.rollback()

    binding, events = bindings.authorise(
        books, city_rules, code, "dc-a", "tenant-1", "company:x"
    )
    again, none = bindings.authorise(
        books, city_rules, code, "dc-a", "tenant-1", "company:x"
    )

    assert binding.status == "authorised" and binding.requested_at is None
    assert again.authorised_at == binding.authorised_at  # a retry moves nothing
    assert none == []
    [event] = events
    assert event.event == "binding_changed"
    assert {k: event.body[k] for k in ("company_id", "status", "actor")} == {
        "company_id": holder,
        "status": "authorised",
        "actor": "company:x",
    }
    assert _steps(books, code) == [
        ("authorise", "authorised", "company:x"),
        ("authorise", "authorised", "company:x"),
    ]


def test_a_withdrawal_refuses_what_comes_after_it(books, city_rules):
    code = issue(books, city_rules).voucher.code
    assert ledger.book_usage(books, city_rules, usage(code, 1_000)).redemptions

    binding, [event] = bindings.withdraw(
        books, city_rules, code, "dc-a", "tenant-1", "company:x"
    )
    withdrawn = (binding.status, event.body["status"])
    refused = ledger.book_usage(books, city_rules, usage(code, 1_000))
    bindings.authorise(books, city_rules, code, "dc-a", "tenant-1", "company:x")
    # Authorised again from now: a job that started before is not subsidised.
    before = ledger.book_usage(books, city_rules, usage(code, 1_000))
    after = ledger.book_usage(books, city_rules, _fresh(code))

    assert withdrawn == ("withdrawn", "withdrawn")
    assert refused.rejected == "tenant_not_authorised"
    assert before.rejected == "before_authorisation"
    assert after.redemptions and after.rejected is None


def test_withdrawing_what_was_never_asked_for_is_not_found(books, city_rules):
    code = issue(books, city_rules, tenants=()).voucher.code
    with pytest.raises(NotFound) as caught:
        bindings.withdraw(books, city_rules, code, "dc-a", "nobody", "company:x")
    assert caught.value.code == "binding_not_found"
    with pytest.raises(NotFound):
        bindings.authorise(books, city_rules, "TC-AAAAAAAAAAAA-0", "dc-a", "t", "x")


def test_a_closed_voucher_authorises_nobody(books, city_rules):
    code = issue(books, city_rules, tenants=()).voucher.code
    ledger.revoke(books, city_rules, code, "fraud", "admin-1")
    with pytest.raises(Conflict) as caught:
        bindings.authorise(books, city_rules, code, "dc-a", "tenant-1", "company:x")
    assert caught.value.code == "voucher_not_active"
    # Withdrawing stays possible (nothing to book on it anyway).
    assert _binding(books, code) is None


def test_a_request_is_applied_once_and_never_authorises(books, city_rules):
    code = issue(books, city_rules, tenants=()).voucher.code
    request = _request(code, "e1")

    first = bindings.apply_requests(books, city_rules, [request, request])
    again = bindings.apply_requests(books, city_rules, [request])
    refused = ledger.book_usage(books, city_rules, _fresh(code))

    assert [e.body["status"] for e in first] == ["requested"]
    assert first[0].body["actor"] == "datacenter:dc-a"
    assert again == []
    assert _binding(books, code).status == "requested"
    assert _steps(books, code) == [("request", "requested", "datacenter:dc-a")]
    assert refused.rejected == "tenant_not_authorised"


def test_a_request_or_cancel_leaves_an_authorisation_alone(books, city_rules):
    code = issue(books, city_rules).voucher.code
    authorised = _binding(books, code)

    changed = bindings.apply_requests(
        books, city_rules, [_request(code, "e1"), _request(code, "e2", "cancel")]
    )

    assert changed == []
    binding = _binding(books, code)
    assert (binding.status, binding.authorised_at) == (
        "authorised",
        authorised.authorised_at,
    )
    assert ledger.book_usage(books, city_rules, usage(code, 1_000)).redemptions


def test_a_cancel_withdraws_a_request_and_a_later_request_renews_it(books, city_rules):
    code = issue(books, city_rules, tenants=()).voucher.code
    now = utcnow()
    steps = [
        _request(code, "e1", at=now),
        _request(code, "e2", "cancel", at=now + SECOND),
        _request(code, "e3", at=now - HOUR),  # stale: before the cancel
    ]

    events = bindings.apply_requests(books, city_rules, steps)
    assert [e.body["status"] for e in events] == ["requested", "withdrawn"]
    assert _binding(books, code).status == "withdrawn"
    renewed = bindings.apply_requests(
        books, city_rules, [_request(code, "e4", at=now + 2 * SECOND)]
    )
    assert [e.body["status"] for e in renewed] == ["requested"]


def test_a_request_for_another_citys_voucher_is_set_aside(books, city_rules):
    assert (
        bindings.apply_requests(
            books, city_rules, [_request("TC-AAAAAAAAAAAA-0", "e1")]
        )
        == []
    )
    assert books.scalars(select(Binding)).all() == []


def test_the_bindings_of_a_voucher_are_listed(books, city_rules):
    code = issue(books, city_rules).voucher.code
    voucher, rows = bindings.list_bindings(books, code)
    assert voucher.code == code
    assert [(b.datacenter_id, b.tenant_id, b.status) for b in rows] == [
        ("dc-a", "tenant-1", "authorised"),
        ("dc-test-01", "tenant-1", "authorised"),
    ]


def test_grace_books_late_usage_and_then_releases_the_balance(books, city_rules):
    code = issue(books, city_rules).voucher.code
    # The voucher expired an hour ago (tc-compute: 7 days' grace).
    expired_at = utcnow() - HOUR
    books.execute(
        update(Voucher).where(Voucher.code == code).values(expires_at=expired_at)
    )
    books.commit()
    ran_before = usage(
        code, 10_000, started_at=expired_at - 2 * HOUR, ended_at=expired_at - HOUR
    )
    ran_on = usage(
        code, 10_000, started_at=expired_at - HOUR, ended_at=expired_at + 1800 * SECOND
    )

    assert ledger.book_usage(books, city_rules, ran_before).redemptions
    assert ledger.book_usage(books, city_rules, ran_on).rejected == "voucher_expired"
    assert ledger.expire_due(books, city_rules) == []  # in its grace period
    ends = expired_at + timedelta(days=7)
    assert ledger.expire_due(books, city_rules, ends - SECOND) == []
    [released] = ledger.expire_due(books, city_rules, ends)
    assert released.body["released_fen"] == 1000_00 - 8_000
    assert ledger.check_ledger(books) == []


def test_consent_helper_dates_the_voucher_back(books, city_rules):
    """The test support's own promise (tests/support/vouchers_books.py)."""
    code = issue(books, city_rules, tenants=()).voucher.code
    consent(books, city_rules, code, [("dc-a", "tenant-1")])
    voucher = books.get(Voucher, code, populate_existing=True)
    books.rollback()
    assert voucher.issued_at < utcnow() - timedelta(hours=23)
    assert _binding(books, code).authorised_at == voucher.issued_at
