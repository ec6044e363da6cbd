"""``CityLedger``: what a worker of the voucher service gets injected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from services.common.parking_store import ParkingStore
from services.vouchers import domain
from services.vouchers.ledger import (
    bindings,
    booking,
    clawback,
    issue,
    lifecycle,
    outbox,
    programs,
    queries,
    statements,
)

# Imported by name: the package's ``review`` is lifecycle's (applications).
from services.vouchers.ledger.review import decide_held, list_held
from services.vouchers.models import Application, OutboxEvent, ParkedEvent


class CityLedger(ParkingStore):
    """What a worker gets injected: one session and the city's rules (and
    the usage queue's parked events, ``services/common/parking_store.py``)."""

    parked_model = ParkedEvent

    def __init__(self, session: Session, rules: domain.CityRules):
        self.session = session
        self.rules = rules

    def apply(
        self, program, company, face_value_fen, decision
    ) -> issue.ApplicationResult:
        return issue.apply(
            self.session, self.rules, program, company, face_value_fen, decision
        )

    def book_usage(self, record: Mapping[str, Any]) -> booking.BookingOutcome:
        return booking.book_usage(self.session, self.rules, record)

    def book_usage_batch(
        self, records: Sequence[Mapping[str, Any]]
    ) -> list[booking.BookingOutcome]:
        return booking.book_usage_batch(self.session, self.rules, records)

    def list_bindings(self, code: str):
        return bindings.list_bindings(self.session, code)

    def authorise_binding(self, code, datacenter_id, tenant_id, actor):
        return bindings.authorise(
            self.session, self.rules, code, datacenter_id, tenant_id, actor
        )

    def withdraw_binding(self, code, datacenter_id, tenant_id, actor):
        return bindings.withdraw(
            self.session, self.rules, code, datacenter_id, tenant_id, actor
        )

    def apply_binding_requests(self, requests) -> list[OutboxEvent]:
        return bindings.apply_requests(self.session, self.rules, requests)

    def get_voucher(self, code: str):
        return queries.get_voucher(self.session, code)

    def program_states(self) -> list[dict[str, Any]]:
        return programs.program_states(self.session, self.rules)

    def check(self) -> list[str]:
        return queries.check_ledger(self.session)

    def review(
        self, application_id, approve, reason, reviewer
    ) -> issue.ApplicationResult:
        return lifecycle.review(
            self.session, self.rules, application_id, approve, reason, reviewer
        )

    def expire_due(self, now=None) -> list[OutboxEvent]:
        return lifecycle.expire_due(self.session, self.rules, now)

    def revoke(self, code: str, reason: str, actor: str):
        return lifecycle.revoke(self.session, self.rules, code, reason, actor)

    def pending_events(
        self, limit: int = 500, older_than_s: float = 0.0
    ) -> list[OutboxEvent]:
        return outbox.pending_events(self.session, limit, older_than_s)

    def mark_published(self, ids: list[int]) -> None:
        outbox.mark_published(self.session, ids)

    def list_applications(self, status=None, limit=100, offset=0):
        return queries.list_applications(self.session, status, limit, offset)

    def get_application(self, application_id: str) -> Application:
        return queries.get_application(self.session, application_id)

    def list_vouchers(self, company_id=None, status=None, limit=100, offset=0):
        return queries.list_vouchers(self.session, company_id, status, limit, offset)

    def list_redemptions(self, code: str, limit: int = 100, offset: int = 0):
        return queries.list_redemptions(self.session, code, limit, offset)

    def voucher_statement(self, code: str, limit: int = 1000, offset: int = 0):
        return queries.voucher_statement(self.session, code, limit, offset)

    def monthly_statement(
        self, code: str, month: str, company_id: str | None = None
    ) -> dict[str, Any]:
        return statements.monthly_statement(
            self.session, self.rules, code, month, company_id=company_id
        )

    def program_statement(self, program_id: str, limit: int = 1000, offset: int = 0):
        return queries.program_statement(self.session, program_id, limit, offset)

    def totals(self) -> dict[str, Any]:
        return queries.ledger_totals(self.session, self.rules)

    # Review and clawback (ledger/review.py, ledger/clawback.py)

    def hold_booked(self, hold_event: Mapping[str, Any]) -> list[OutboxEvent]:
        return clawback.hold_booked(self.session, self.rules, hold_event)

    def list_held(self, status=None, limit: int = 100, offset: int = 0):
        return list_held(self.session, status, limit, offset)

    def decide_held(self, datacenter_id, record_id, decision, reason, actor):
        return decide_held(
            self.session, self.rules, datacenter_id, record_id, decision, reason, actor
        )

    def claw_back(self, datacenter_id, record_id, reason, actor, voucher_code=None):
        return clawback.claw_back(
            self.session,
            self.rules,
            datacenter_id,
            record_id,
            reason,
            actor,
            voucher_code,
        )
