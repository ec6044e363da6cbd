"""Test data of the portal and the federation API: the national admin's token
(the portal's unit tests) and data centres as the registry describes them."""

from __future__ import annotations

from typing import Any

NATIONAL = "tok-national"  # the national admin's token in the fake registry


def datacenter(
    *, gpus: int = 8, price_fen_per_gpu_hour: int = 1500, **overrides: Any
) -> dict[str, Any]:
    """A western, government-run data centre of ``gpus`` imported H800s."""
    body = {
        "id": "dc-1",
        "name": "DC",
        "hub_region": "west",
        "government_run": True,
        "inventory": [
            {
                "gpu_model": "H800",
                "count": gpus,
                "chip_origin": "imported",
                "price_fen_per_gpu_hour": price_fen_per_gpu_hour,
            }
        ],
    }
    body.update(overrides)
    return body
