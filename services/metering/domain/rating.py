"""What metering takes from a data centre to rate a usage record (no I/O).

A usage record that passes validation is rated: ``cost_fen =
round_half_up(gpu_seconds × price_fen_per_gpu_hour / 3600)``
(``services.common.units.rate_cost_fen``), at its data centre's price for its
GPU model; the event it becomes also carries the data centre's
``government_run``, ``hub_region`` and the model's ``chip_origin``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.metering.domain.validation import Reason, Refused

# (price_fen_per_gpu_hour, government_run, hub_region, chip_origin)
PriceTerms = tuple[int, bool, str, str]


def inventory_item(datacenter: Mapping[str, Any], gpu_model: str) -> dict[str, Any]:
    """The data centre's inventory line for ``gpu_model``."""
    for item in datacenter.get("inventory") or ():
        if item.get("gpu_model") == gpu_model:
            return dict(item)
    raise Refused(
        Reason.UNKNOWN_GPU_MODEL,
        f"{gpu_model!r} is not in the inventory of {datacenter.get('id')!r}",
    )


def price_terms(datacenter: Mapping[str, Any], gpu_model: str) -> PriceTerms:
    """What rating takes from the data centre for ``gpu_model``:
    ``(price_fen_per_gpu_hour, government_run, hub_region, chip_origin)``;
    the same for every record of that model (``ingest`` asks once a batch,
    then prices each record with ``units.rate_cost_fen``).
    """
    item = inventory_item(datacenter, gpu_model)
    price = int(item["price_fen_per_gpu_hour"])
    return (
        price,
        bool(datacenter.get("government_run")),
        datacenter.get("hub_region") or "",
        item.get("chip_origin") or "imported",
    )
