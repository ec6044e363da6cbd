"""Bindings (CONTRACTS.md §7): the tenants a voucher's holder lets it pay for.

A data centre asks to bill a tenant's records to a voucher (its
``binding_requested`` events, applied here idempotently by event id); the
holder authorises or withdraws the tenant on the portal. Every step is
written to ``binding_changes`` (who, what, when) and every change of status
to the outbox as ``binding_changed``, published after the commit.

Every writer of a binding first locks its voucher's row, as a booking batch
does: a withdrawal waits for the batch booking on the voucher and every
later batch sees it, so nothing is booked on a binding after it is
withdrawn. Booking reads the authorised bindings of a batch in one query
(:func:`authorised_at`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, tuple_
from sqlalchemy.orm import Session

from services.common.contracts import event_id
from services.common.errors import Conflict, NotFound
from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.ledger.outbox import write_event
from services.vouchers.ledger.sql import dialect, lock_rows, transaction
from services.vouchers.models import Binding, BindingChange, OutboxEvent, Voucher

log = logging.getLogger(__name__)

AUTHORISE = "authorise"
WITHDRAW = "withdraw"

BindingKey = tuple[str, str, str]  # (voucher_code, datacenter_id, tenant_id)


def list_bindings(session: Session, code: str) -> tuple[Voucher, list[Binding]]:
    """The voucher and its bindings, by data centre and tenant."""
    voucher = session.get(Voucher, code)
    if voucher is None:
        session.rollback()
        raise _voucher_not_found(code)
    rows = list(
        session.scalars(
            select(Binding)
            .where(Binding.voucher_code == code)
            .order_by(Binding.datacenter_id, Binding.tenant_id)
        )
    )
    session.rollback()
    return voucher, rows


def authorise(
    session: Session,
    rules: domain.CityRules,
    code: str,
    datacenter_id: str,
    tenant_id: str,
    actor: str,
) -> tuple[Binding, list[OutboxEvent]]:
    """The holder authorises a tenant (asked for or not); records that start
    from now are subsidised. Authorising it again changes nothing (a retried
    PUT does not move ``authorised_at``). ``Conflict voucher_not_active`` on
    an expired or revoked voucher."""
    return _decide(session, rules, code, datacenter_id, tenant_id, actor, AUTHORISE)


def withdraw(
    session: Session,
    rules: domain.CityRules,
    code: str,
    datacenter_id: str,
    tenant_id: str,
    actor: str,
) -> tuple[Binding, list[OutboxEvent]]:
    """The holder withdraws a tenant (or turns a request down); its records
    are refused from the next batch on. ``NotFound binding_not_found`` when
    the data centre never asked and the holder never authorised it."""
    return _decide(session, rules, code, datacenter_id, tenant_id, actor, WITHDRAW)


def _decide(
    session: Session,
    rules: domain.CityRules,
    code: str,
    datacenter_id: str,
    tenant_id: str,
    actor: str,
    action: str,
) -> tuple[Binding, list[OutboxEvent]]:
    now = utcnow()
    with transaction(session):
        voucher = lock_rows(session, Voucher, Voucher.code, [code]).get(code)
        if voucher is None:
            raise _voucher_not_found(code)
        key = (code, datacenter_id, tenant_id)
        binding = _bindings(session, [key]).get(key)
        if action == AUTHORISE:
            if voucher.status != domain.ACTIVE:
                raise Conflict(
                    "voucher_not_active",
                    f"voucher {code} is {voucher.status}",
                    {"status": voucher.status},
                )
            wanted = domain.AUTHORISED
        elif binding is None:
            raise NotFound(
                "binding_not_found",
                f"voucher {code} has no binding of {tenant_id} at {datacenter_id}",
            )
        else:
            wanted = domain.WITHDRAWN
        events = []
        if binding is None or binding.status != wanted:
            binding = binding or _new_binding(session, key, wanted, now)
            binding.status = wanted
            if wanted == domain.AUTHORISED:
                binding.authorised_at = now
            else:
                binding.withdrawn_at = now
            binding.updated_at = now
            events.append(_changed(session, rules, voucher, binding, actor, now))
        _history(session, binding, action, actor, now)
    return binding, events


def apply_requests(
    session: Session, rules: domain.CityRules, requests: Sequence[Mapping[str, Any]]
) -> list[OutboxEvent]:
    """Apply loaded ``binding_requested`` events in one transaction; the
    ``binding_changed`` events of what they changed come back, to publish.

    Each event is applied once (its id is kept with the step it wrote); a
    request for a voucher this city never issued is logged and set aside.
    """
    if not requests:
        return []
    with transaction(session):
        fresh = _unseen(session, requests)
        vouchers = lock_rows(
            session, Voucher, Voucher.code, {r["voucher_code"] for r in fresh}
        )
        bindings = _bindings(
            session,
            [_key(r) for r in fresh if r["voucher_code"] in vouchers],
        )
        events = []
        for request in fresh:
            voucher = vouchers.get(request["voucher_code"])
            if voucher is None:
                log.warning(
                    "binding_requested %s names voucher %r, not one of %s's",
                    request["event_id"],
                    request["voucher_code"],
                    rules.city,
                )
                continue
            change = _apply_request(session, rules, voucher, bindings, request)
            if change is not None:
                events.append(change)
    return events


def _apply_request(
    session: Session,
    rules: domain.CityRules,
    voucher: Voucher,
    bindings: dict[BindingKey, Binding],
    request: Mapping[str, Any],
) -> OutboxEvent | None:
    """One data centre's request or cancel: the step always, the change if any."""
    key, at, now = _key(request), request["requested_at"], utcnow()
    actor = f"datacenter:{request['datacenter_id']}"
    binding = bindings.get(key)
    status = domain.binding_after(
        binding.status if binding is not None else None,
        binding.requested_at if binding is not None else None,
        binding.withdrawn_at if binding is not None else None,
        request["action"],
        at,
    )
    if binding is None and status is None:  # a cancel of nothing
        _step(session, key, request["action"], "none", actor, now, request["event_id"])
        return None
    if binding is None:
        binding = bindings[key] = _new_binding(session, key, status, now)
    event = None
    if status is not None:
        binding.status = status
        event = _changed(session, rules, voucher, binding, actor, now)
    if request["action"] == domain.REQUEST and binding.status == domain.REQUESTED:
        binding.requested_at = max(filter(None, (binding.requested_at, at)))
    elif status == domain.WITHDRAWN:
        binding.withdrawn_at = at
    binding.updated_at = now
    _history(session, binding, request["action"], actor, now, request["event_id"])
    return event


def authorised_at(
    session: Session, keys: Iterable[BindingKey]
) -> dict[BindingKey, datetime]:
    """``authorised_at`` of each of ``keys`` whose binding is authorised.

    One statement for a batch. On PostgreSQL a LATERAL probe of the primary
    key per key, as booking's other lookups (booking.py says why): a plan
    that reads the table can't be chosen, whatever its statistics.
    """
    keys = sorted(set(keys))
    if not keys:
        return {}
    if dialect(session) == "postgresql":
        codes, datacenters, tenants = (list(c) for c in zip(*keys, strict=True))
        rows = session.execute(
            _AUTHORISED_SQL, {"codes": codes, "dcs": datacenters, "tenants": tenants}
        )
    else:
        rows = session.execute(
            select(
                Binding.voucher_code,
                Binding.datacenter_id,
                Binding.tenant_id,
                Binding.authorised_at,
            ).where(
                tuple_(
                    Binding.voucher_code, Binding.datacenter_id, Binding.tenant_id
                ).in_(keys),
                Binding.status == domain.AUTHORISED,
            )
        )
    return {(code, dc, tenant): at for code, dc, tenant, at in rows}


_AUTHORISED_SQL = text(
    "SELECT b.voucher_code, b.datacenter_id, b.tenant_id, b.authorised_at "
    "FROM unnest(CAST(:codes AS TEXT[]), CAST(:dcs AS TEXT[]), "
    "CAST(:tenants AS TEXT[])) AS k(code, dc, tenant) CROSS JOIN LATERAL "
    "(SELECT voucher_code, datacenter_id, tenant_id, authorised_at FROM bindings "
    "WHERE voucher_code = k.code AND datacenter_id = k.dc AND tenant_id = k.tenant "
    f"AND status = '{domain.AUTHORISED}' OFFSET 0) AS b"
).columns(
    Binding.voucher_code,
    Binding.datacenter_id,
    Binding.tenant_id,
    Binding.authorised_at,
)


# --------------------------------------------------------------------------


def _voucher_not_found(code: str) -> NotFound:
    # As queries.not_found words it (not imported: queries imports booking,
    # which imports this module).
    return NotFound("voucher_not_found", f"no voucher {code}")


def _key(request: Mapping[str, Any]) -> BindingKey:
    return (request["voucher_code"], request["datacenter_id"], request["tenant_id"])


def _new_binding(
    session: Session, key: BindingKey, status: str, now: datetime
) -> Binding:
    code, datacenter_id, tenant_id = key
    binding = Binding(
        voucher_code=code,
        datacenter_id=datacenter_id,
        tenant_id=tenant_id,
        status=status,
        updated_at=now,
    )
    session.add(binding)
    return binding


def _bindings(
    session: Session, keys: Iterable[BindingKey]
) -> dict[BindingKey, Binding]:
    """The bindings of ``keys`` (their vouchers locked by the caller)."""
    keys = sorted(set(keys))
    if not keys:
        return {}
    statement = (
        select(Binding)
        .where(
            tuple_(Binding.voucher_code, Binding.datacenter_id, Binding.tenant_id).in_(
                keys
            )
        )
        .execution_options(populate_existing=True)
    )
    return {
        (b.voucher_code, b.datacenter_id, b.tenant_id): b
        for b in session.scalars(statement)
    }


def _unseen(
    session: Session, requests: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """``requests`` less those applied before or twice in the batch, in order."""
    ids = {r["event_id"] for r in requests}
    seen = set(
        session.scalars(
            select(BindingChange.event_id).where(BindingChange.event_id.in_(ids))
        )
    )
    fresh = []
    for request in requests:
        if request["event_id"] not in seen:
            seen.add(request["event_id"])
            fresh.append(request)
    return fresh


def _history(
    session: Session,
    binding: Binding,
    action: str,
    actor: str,
    now: datetime,
    eid: str | None = None,
) -> None:
    key = (binding.voucher_code, binding.datacenter_id, binding.tenant_id)
    _step(session, key, action, binding.status, actor, now, eid)


def _step(
    session: Session,
    key: BindingKey,
    action: str,
    status: str,
    actor: str,
    now: datetime,
    eid: str | None,
) -> None:
    code, datacenter_id, tenant_id = key
    session.add(
        BindingChange(
            voucher_code=code,
            datacenter_id=datacenter_id,
            tenant_id=tenant_id,
            action=action,
            status=status,
            actor=actor[:128],
            event_id=eid,
            changed_at=now,
        )
    )


def _changed(
    session: Session,
    rules: domain.CityRules,
    voucher: Voucher,
    binding: Binding,
    actor: str,
    now: datetime,
) -> OutboxEvent:
    """The ``binding_changed`` event of ``binding``'s new status."""
    return write_event(
        session,
        rules.city,
        "binding_changed",
        event_id(
            "binding_changed",
            rules.city,
            binding.voucher_code,
            binding.datacenter_id,
            binding.tenant_id,
            binding.status,
            now.isoformat(),
        ),
        voucher_code=binding.voucher_code,
        company_id=voucher.company_id,
        datacenter_id=binding.datacenter_id,
        tenant_id=binding.tenant_id,
        status=binding.status,
        actor=actor[:128],
        changed_at=now,
    )
