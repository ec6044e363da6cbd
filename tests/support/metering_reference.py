"""Reference implementations that metering's hot path must equal (tests only).

The running code encodes a record, its event and its signature check by
hand, for speed (``services.metering.domain.encoding``,
``services.common.signing``); each function here is the plain way to get the
same result, which the tests in ``tests/unit/metering`` and
``tests/unit/common`` compare the fast path against. Nothing in ``services/``
calls these.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.common import contracts
from services.common.units import format_ts, rate_cost_fen
from services.metering.domain.encoding import (
    dump_record,
    record_json,
    usage_rated_bytes,
    usage_rated_event_id,
)
from services.metering.domain.rating import price_terms


@dataclass(frozen=True)
class Rating:
    """What rating a record adds to it."""

    cost_fen: int
    unit_price_fen_per_gpu_hour: int
    datacenter: dict[str, Any] = field(default_factory=dict)


def rate(record: Mapping[str, Any], datacenter: Mapping[str, Any]) -> Rating:
    """Price a validated record with its data centre's price for its GPU model
    (what ``ingest.check`` adds to a record's row, one record at a time)."""
    price, government_run, hub_region, chip_origin = price_terms(
        datacenter, record["gpu_model"]
    )
    return Rating(
        cost_fen=rate_cost_fen(record["gpu_seconds"], price),
        unit_price_fen_per_gpu_hour=price,
        datacenter={
            "government_run": government_run,
            "hub_region": hub_region,
            "chip_origin": chip_origin,
        },
    )


def usage_rated_event(
    record: Mapping[str, Any], city: str, rating: Rating, rated_at: datetime
) -> dict[str, Any]:
    """The ``<city>.usage_rated`` event of a loaded record, as a dict: the
    contract's event id, the schema's dump of the record, what rating adds.

    ``occurred_at`` is when the record was rated (stored), so a re-publish
    after a crash is byte-for-byte the first publish.
    ``test_usage_rated_event_matches_the_contract`` checks it against
    ``contracts.make_event``.
    """
    event = {
        "event_id": contracts.event_id(
            "usage_rated", record["datacenter_id"], record["record_id"]
        ),
        "city": city,
        "occurred_at": format_ts(rated_at),
    }
    event.update(contracts.UsageRecordSchema().dump(record))
    event["cost_fen"] = rating.cost_fen
    event["unit_price_fen_per_gpu_hour"] = rating.unit_price_fen_per_gpu_hour
    event["datacenter"] = {
        "government_run": bool(rating.datacenter["government_run"]),
        "hub_region": rating.datacenter["hub_region"],
        "chip_origin": rating.datacenter["chip_origin"],
    }
    return event


def usage_rated_body(
    record: Mapping[str, Any],
    city: str,
    rating: Rating,
    rated_at: datetime,
    record_json_: bytes | None = None,
) -> bytes:
    """``encoding.usage_rated_bytes`` of a record and its :class:`Rating`
    (the hot path passes a stored row's columns instead).
    ``test_usage_rated_body_is_the_event`` checks it loads to
    :func:`usage_rated_event`.
    """
    if record_json_ is None:
        record_json_ = record_json(record)
    return usage_rated_bytes(
        usage_rated_event_id(record["datacenter_id"], record["record_id"]),
        city,
        rated_at,
        record_json_,
        rating.cost_fen,
        rating.unit_price_fen_per_gpu_hour,
        rating.datacenter["government_run"],
        rating.datacenter["hub_region"],
        rating.datacenter["chip_origin"],
    )


_PRESORTED_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def slow_record_json(record: Mapping[str, Any]) -> bytes:
    """``encoding.record_json`` through ``json``'s encoder (the dump's keys are
    in order already, so without sorting): bytes, or the encoder's error."""
    return _PRESORTED_CANONICAL.encode(dump_record(record)).encode()


def one_shot_verify(body: bytes, secret: str, signature: str | None) -> bool:
    """``signing.verify`` as first written: a new HMAC keyed per call."""
    if not signature or not isinstance(signature, str):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.lower())
