"""Consent and time (DESIGN.md §9), pure Python: a binding's steps and the
moments a record may be booked at; ``domain`` names them for the ledger.

A binding (CONTRACTS.md §7) is a tenant of a data centre the voucher may pay
for: the data centre asks (``requested``), the holder decides
(``authorised``, ``withdrawn``). A voucher pays for usage from its issue to
its expiry, and books the late records of that time for ``grace_days``
after it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

REQUESTED = "requested"
AUTHORISED = "authorised"
WITHDRAWN = "withdrawn"
BINDING_STATUSES = (REQUESTED, AUTHORISED, WITHDRAWN)
# What a data centre's binding_requested asks.
REQUEST = "request"
CANCEL = "cancel"

DEFAULT_GRACE_DAYS = 7
MAX_GRACE_DAYS = 90


def expired(expires_at: datetime, at: datetime) -> bool:
    """Whether a voucher expiring at ``expires_at`` is past its date ``at`` a
    moment: usage that started then is refused, and from then it is due."""
    return at >= expires_at


def in_time(
    expires_at: datetime,
    grace_days: int,
    started_at: datetime,
    ended_at: datetime,
    now: datetime,
) -> bool:
    """Whether a record's times let it be booked on a voucher expiring then.

    Usage that started at or after expiry never is. Before expiry a record is
    booked as it comes; from expiry to the end of the grace period only the
    record of a job that ended by expiry is (late usage of time the voucher
    covered), never one that ran on past it.
    """
    if expired(expires_at, started_at):
        return False
    if not expired(expires_at, now):
        return True
    return ended_at <= expires_at and now < grace_ends(expires_at, grace_days)


def grace_ends(expires_at: datetime, grace_days: int) -> datetime:
    """When the grace period of a voucher expiring at ``expires_at`` ends."""
    return expires_at + timedelta(days=grace_days)


def binding_after(
    status: str | None,
    requested_at: datetime | None,
    withdrawn_at: datetime | None,
    action: str,
    at: datetime,
) -> str | None:
    """The status a data centre's ``request`` (or ``cancel``) made ``at``
    leaves a binding in (``status`` None: there is none yet), or None when it
    changes nothing.

    A data centre only asks: a request never touches an authorised binding,
    and a cancel withdraws a request but never an authorisation (the holder
    decides). A request older than the binding's latest withdrawal, or a
    cancel older than its latest request, arrived out of order and is stale.
    """
    if action == REQUEST:
        if status in (REQUESTED, AUTHORISED):
            return None
        if withdrawn_at is not None and at < withdrawn_at:
            return None
        return REQUESTED
    if status != REQUESTED or (requested_at is not None and at < requested_at):
        return None
    return WITHDRAWN
