"""Test data of the portal's unit tests: cities, vouchers and applications.

The fake RPC client, the app and its test client are shared with the
security ring: ``tests/support/portal_app.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.common import creditcode, vouchercode


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
            "company_id": creditcode.generate(),
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
            "registration_id": creditcode.generate(),
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
