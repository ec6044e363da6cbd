"""Test data of the federation: what cities announce on the bus."""

from __future__ import annotations

from typing import Any


def program(city: str, budget_fen: int, **overrides: Any) -> dict[str, Any]:
    """A compute program of ``city`` as its ``program_published`` lists it."""
    body = {
        "id": f"{city}-compute",
        "kind": "compute",
        "budget_fen": budget_fen,
        "rate_bp": 8000,
        "rules_version": "v1",
        "rules_sha256": "c" * 64,
    }
    body.update(overrides)
    return body
