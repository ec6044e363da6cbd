"""The city page's budget burn-down, replayed from the programs' ledgers."""

from __future__ import annotations

import json
import re

from nameko.exceptions import UnknownService

from gateway import dashboard


def _entry(n: int, account: str, amount: int, at: str) -> dict:
    return {
        "id": n,
        "account": account,
        "amount_fen": amount,
        "reference": f"ref-{n}",
        "created_at": at,
    }


PROGRAM = {
    "id": "p",
    "kind": "compute",
    "budget_fen": 1_000_00,
    "rate_bp": 8000,
    "available_fen": 700_00,
    "committed_fen": 200_00,
    "redeemed_fen": 100_00,
    "released_fen": 0,
    "rules_version": "v1",
}

LEDGER = [
    _entry(1, "program:p:available", 1_000_00, "2025-03-01T08:00:00Z"),
    _entry(2, "program:p:available", -300_00, "2025-03-01T09:00:00Z"),
    _entry(3, "program:p:committed", 300_00, "2025-03-01T09:00:00Z"),
    _entry(4, "program:p:committed", -100_00, "2025-03-01T10:00:00Z"),
    _entry(5, "program:p:redeemed", 100_00, "2025-03-01T10:00:00Z"),
]


def _charts(html: str) -> dict:
    found = re.search(r'id="chart-data">(.*?)</script>', html, re.S)
    return json.loads(found.group(1))


def test_city_page_draws_committed_and_redeemed_over_time(
    client, rpc, city_factory, monkeypatch
):
    monkeypatch.setattr(dashboard, "STATEMENT_PAGE", 2)  # pages are followed
    rpc.replies[("city_registry", "get_city")] = city_factory(programs=[PROGRAM])
    rpc.replies[("vouchers_shanghai", "program_statement")] = (
        lambda program_id, limit, offset: {
            "program": {},
            "entries": LEDGER[offset : offset + limit],
            "total": len(LEDGER),
        }
    )

    response = client.get("/cities/shanghai")

    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'data-chart="burndown"' in html
    assert _charts(html)["burndown"] == {
        "labels": ["2025-03-01 08:00", "2025-03-01 09:00", "2025-03-01 10:00"],
        "available": [1000.0, 700.0, 700.0],
        "committed": [0.0, 300.0, 200.0],
        "redeemed": [0.0, 0.0, 100.0],
    }
    assert len(rpc.called("vouchers_shanghai", "program_statement")) == 3


def test_city_page_shows_without_a_burn_down_when_the_city_is_away(
    client, rpc, city_factory
):
    rpc.replies[("city_registry", "get_city")] = city_factory(programs=[PROGRAM])
    rpc.replies[("vouchers_shanghai", "program_statement")] = UnknownService("x")

    response = client.get("/cities/shanghai")

    assert response.status_code == 200
    assert 'data-chart="burndown"' not in response.get_data(as_text=True)
