"""``CityLedger``: what a worker of the voucher service gets injected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from services.vouchers import domain
from services.vouchers.ledger.booking import (
    BookingOutcome,
    book_usage,
    book_usage_batch,
)
from services.vouchers.ledger.issue import ApplicationResult, apply
from services.vouchers.ledger.lifecycle import expire_due, review, revoke
from services.vouchers.ledger.outbox import mark_published, pending_events
from services.vouchers.ledger.programs import program_states
from services.vouchers.ledger.queries import (
    check_ledger,
    get_application,
    get_voucher,
    ledger_totals,
    list_applications,
    list_vouchers,
    program_statement,
    voucher_statement,
)
from services.vouchers.models import Application, OutboxEvent


class CityLedger:
    """What a worker gets injected: one session and the city's rules."""

    def __init__(self, session: Session, rules: domain.CityRules):
        self.session = session
        self.rules = rules

    def apply(self, program, company, face_value_fen, decision) -> ApplicationResult:
        return apply(
            self.session, self.rules, program, company, face_value_fen, decision
        )

    def book_usage(self, record: Mapping[str, Any]) -> BookingOutcome:
        return book_usage(self.session, self.rules, record)

    def book_usage_batch(
        self, records: Sequence[Mapping[str, Any]]
    ) -> list[BookingOutcome]:
        return book_usage_batch(self.session, self.rules, records)

    def get_voucher(self, code: str):
        return get_voucher(self.session, code)

    def program_states(self) -> list[dict[str, Any]]:
        return program_states(self.session, self.rules)

    def check(self) -> list[str]:
        return check_ledger(self.session)

    def review(self, application_id, approve, reason, reviewer) -> ApplicationResult:
        return review(
            self.session, self.rules, application_id, approve, reason, reviewer
        )

    def expire_due(self, now=None) -> list[OutboxEvent]:
        return expire_due(self.session, self.rules, now)

    def revoke(self, code: str, reason: str, actor: str):
        return revoke(self.session, self.rules, code, reason, actor)

    def pending_events(
        self, limit: int = 500, older_than_s: float = 0.0
    ) -> list[OutboxEvent]:
        return pending_events(self.session, limit, older_than_s)

    def mark_published(self, ids: list[int]) -> None:
        mark_published(self.session, ids)

    def list_applications(self, status=None, limit=100, offset=0):
        return list_applications(self.session, status, limit, offset)

    def get_application(self, application_id: str) -> Application:
        return get_application(self.session, application_id)

    def list_vouchers(self, company_id=None, status=None, limit=100, offset=0):
        return list_vouchers(self.session, company_id, status, limit, offset)

    def voucher_statement(self, code: str, limit: int = 1000, offset: int = 0):
        return voucher_statement(self.session, code, limit, offset)

    def program_statement(self, program_id: str, limit: int = 1000, offset: int = 0):
        return program_statement(self.session, program_id, limit, offset)

    def totals(self) -> dict[str, Any]:
        return ledger_totals(self.session, self.rules)
