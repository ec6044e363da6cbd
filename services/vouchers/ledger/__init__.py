"""The city's ledger in its database: each operation is one transaction.

``domain`` decides; this package locks, writes the rows and the append-only
ledger entries, and commits. Its modules, along the seams of the work:

- ``sql``: what differs between PostgreSQL and SQLite (row locks or a process
  lock, COPY or INSERT), and the transaction every write runs in;
- ``postings``, ``outbox``: ledger entries, budget shifts, federation events;
- ``programs``: the program rows funded from the rules file;
- ``issue``: applications and the issue of vouchers;
- ``bindings``: the tenants a voucher's holder lets it pay for (asked for by
  data centres, authorised or withdrawn by the holder);
- ``redemptions``: the rows a booking writes, its outcomes and their event ids;
- ``booking``: rated usage booked, once, in batches (a record is a batch of one);
- ``lookups``: what a batch, or a review, finds booked, refused or held before;
- ``decisions``: the ``usage_decisions`` row of every hold, release, refusal,
  clawback and replay;
- ``arrival``: a record held as it arrives, a refusal forgotten on replay;
- ``review``: the queue of held records, released or refused;
- ``clawback``: a booked subsidy taken back (a hold after booking, a clawback);
- ``lifecycle``: review, expiry and revocation;
- ``queries``: listings, statements, totals and the reconciliation;
- ``statements``: a voucher's monthly statement, reconciled to its postings;
- ``city``: ``CityLedger``, the session and rules a worker gets injected.
"""

from services.vouchers.ledger.booking import book_usage, book_usage_batch
from services.vouchers.ledger.city import CityLedger
from services.vouchers.ledger.issue import ApplicationResult, apply
from services.vouchers.ledger.lifecycle import expire_due, review, revoke
from services.vouchers.ledger.outbox import mark_published, pending_events
from services.vouchers.ledger.programs import program_states, sync_programs
from services.vouchers.ledger.queries import (
    check_ledger,
    get_application,
    get_voucher,
    ledger_totals,
    list_applications,
    list_redemptions,
    list_vouchers,
    program_statement,
    voucher_statement,
)
from services.vouchers.ledger.redemptions import (
    REVERSAL,
    USAGE,
    BookingOutcome,
    RedemptionRow,
)
from services.vouchers.ledger.statements import monthly_statement

__all__ = [
    "REVERSAL",
    "USAGE",
    "ApplicationResult",
    "BookingOutcome",
    "CityLedger",
    "RedemptionRow",
    "apply",
    "book_usage",
    "book_usage_batch",
    "check_ledger",
    "expire_due",
    "get_application",
    "get_voucher",
    "ledger_totals",
    "list_applications",
    "list_redemptions",
    "list_vouchers",
    "mark_published",
    "monthly_statement",
    "pending_events",
    "program_statement",
    "program_states",
    "review",
    "revoke",
    "sync_programs",
    "voucher_statement",
]
