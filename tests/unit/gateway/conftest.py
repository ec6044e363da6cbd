"""Fixtures for the portal's unit tests: a fake RPC client, no broker."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from gateway.app import create_app
from gateway.audit import AUDIT, AUDIT_DATABASE_URL
from services.common import vouchercode
from tests.support.portal_data import NATIONAL


class FakeRpc:
    """Records every call; answers from ``replies[(service, method)]``.

    A reply may be a value, an exception (raised) or a callable (called with
    the arguments). Tokens map to roles through ``roles``. Unless answered
    itself, the registry's ``public_view`` is composed as the registry does it:
    the ``network_summary`` reply beside the ``list_cities`` one.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple, dict]] = []
        self.replies: dict[tuple[str, str], Any] = {}
        self.roles: dict[str, str] = {NATIONAL: "national_admin"}

    def call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((service, method, args, kwargs))
        if (service, method) == ("city_registry", "authenticate"):
            role = self.roles.get(args[0])
            return {"role": role} if role else None
        if (service, method) == ("city_registry", "public_view") and (
            (service, method) not in self.replies
        ):
            return {
                "summary": self._answer("network_summary"),
                "cities": self._answer("list_cities") or [],
            }
        reply = self.replies.get((service, method))
        if isinstance(reply, BaseException):
            raise reply
        if callable(reply):
            return reply(*args, **kwargs)
        return reply

    def _answer(self, method: str) -> Any:
        reply = self.replies.get(("city_registry", method))
        if isinstance(reply, BaseException):
            raise reply
        return reply() if callable(reply) else reply

    def called(self, service: str, method: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for s, m, a, k in self.calls if (s, m) == (service, method)]


@pytest.fixture
def rpc() -> FakeRpc:
    return FakeRpc()


@pytest.fixture
def app(rpc, tmp_path):
    app = create_app(
        {
            "rpc": rpc,
            "AMQP_URI": "amqp://guest:guest@127.0.0.1:1/",
            AUDIT_DATABASE_URL: f"sqlite:///{tmp_path / 'portal.db'}",
        }
    )
    yield app
    app.extensions[AUDIT].dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def token_for(rpc) -> Callable[[str], dict[str, str]]:
    """``token_for("company:shanghai:C1")`` → headers carrying a fresh token."""

    def make(role: str) -> dict[str, str]:
        token = f"tok-{uuid.uuid4().hex}"
        rpc.roles[token] = role
        return {"Authorization": f"Bearer {token}"}

    return make


@pytest.fixture
def city_factory() -> Callable[..., dict]:
    def make(**overrides: Any) -> dict:
        city = {
            "code": "shanghai",
            "name": "Shanghai",
            "region": "east",
            "voucher_prefix": "SH",
            "status": "live",
            "last_heartbeat_at": "2025-03-01T08:00:00Z",
            "budget_fen": 60_000_000_000,
            "available_fen": 59_800_000_000,
            "committed_fen": 200_000_000,
            "redeemed_fen": 0,
            "released_fen": 0,
            "vouchers_issued": 1,
            "programs": [],
        }
        return city | overrides

    return make


@pytest.fixture
def voucher_factory() -> Callable[..., dict]:
    def make(**overrides: Any) -> dict:
        voucher = {
            "code": vouchercode.generate("SH"),
            "city": "shanghai",
            "program_id": "sh-compute-2025",
            "company_id": f"C{uuid.uuid4().hex[:8]}",
            "status": "active",
            "face_value_fen": 100_000_000,
            "balance_fen": 100_000_000,
            "redeemed_fen": 0,
            "released_fen": 0,
            "issued_at": "2025-03-01T08:00:00Z",
            "expires_at": "2026-03-01T08:00:00Z",
            "redemptions": [],
        }
        return voucher | overrides

    return make


@pytest.fixture
def application_factory() -> Callable[..., dict]:
    def make(**company_overrides: Any) -> dict:
        company = {
            "registration_id": f"C{uuid.uuid4().hex[:8]}",
            "name": "Deep Shanghai AI Ltd",
            "registered_in": "shanghai",
            "employees": 42,
            "annual_revenue_cny": 8_000_000,
            "government_research_project": False,
            "founded_on": "2021-05-04",
            "sector": "ai",
        }
        return {
            "program_id": "sh-compute-2025",
            "company": company | company_overrides,
            "requested_face_value_cny": 1_000_000,
        }

    return make
