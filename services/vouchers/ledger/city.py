"""``CityLedger``: what a worker of the voucher service gets injected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from services.vouchers import domain
from services.vouchers.ledger import (
    booking,
    issue,
    lifecycle,
    outbox,
    programs,
    queries,
)
from services.vouchers.models import Application, OutboxEvent


class CityLedger:
    """What a worker gets injected: one session and the city's rules."""

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

    def program_statement(self, program_id: str, limit: int = 1000, offset: int = 0):
        return queries.program_statement(self.session, program_id, limit, offset)

    def totals(self) -> dict[str, Any]:
        return queries.ledger_totals(self.session, self.rules)
