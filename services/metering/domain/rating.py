"""What metering takes from a data centre to rate a usage record (no I/O).

A usage record that passes validation is rated: ``cost_fen =
round_half_up(gpu_seconds × price_fen_per_gpu_hour / 3600)``
(``services.common.units.rate_cost_fen``), at its data centre's price for its
GPU model; the event it becomes also carries the data centre's
``government_run``, ``hub_region`` and the model's ``chip_origin``.

A record holds at most the data centre's registered GPUs of its model
(``exceeds_inventory``, :func:`check_inventory`; DESIGN.md §9): the count is
read from the same inventory line as the price, once a batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.metering.domain.validation import Reason, Refused

# (price_fen_per_gpu_hour, government_run, hub_region, chip_origin)
PriceTerms = tuple[int, bool, str, str]
# PriceTerms and the registered count of the model: what a batch keeps per model
ModelTerms = tuple[int, bool, str, str, int]


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


def registered_gpus(datacenter: Mapping[str, Any], gpu_model: str) -> int:
    """How many GPUs of ``gpu_model`` the data centre registered (0 when its
    inventory line names no count: then no record of the model fits)."""
    return int(inventory_item(datacenter, gpu_model).get("count") or 0)


def model_terms(datacenter: Mapping[str, Any], gpu_model: str) -> ModelTerms:
    """:func:`price_terms` and :func:`registered_gpus` of ``gpu_model``, from
    one look at the inventory (``ingest.Lookups`` asks once a batch)."""
    terms = price_terms(datacenter, gpu_model)
    return (*terms, registered_gpus(datacenter, gpu_model))


def check_inventory(
    gpu_count: int, registered: int, datacenter_id: str, gpu_model: str
) -> None:
    """A record claims at most the ``registered`` GPUs of its model at its
    data centre, else :class:`Refused` ``exceeds_inventory``."""
    if gpu_count > registered:
        raise Refused(
            Reason.EXCEEDS_INVENTORY,
            f"gpu_count {gpu_count} exceeds the {registered} {gpu_model!r} GPUs "
            f"registered at {datacenter_id!r}",
        )
