"""Federation events as the registry reads them (CONTRACTS.md §3): which
routing keys it binds, how a message is decoded and refused, and how each
event moves a program's and a city's money."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from marshmallow import ValidationError

from services.city_registry.domain.state import Figures
from services.common import vouchercode
from services.common.contracts import CITY_CODE, load_event
from services.common.terms import TERMS_ON_THE_WIRE

# Events of computenet.federation that the registry projects (CONTRACTS.md §3).
# Cities' refusals, holds, verdicts and clawbacks (issue 15): listed, not
# money (that moves by voucher_redeemed, negative for what is taken back).
REVIEW_EVENTS = (
    "usage_refused",
    "usage_held",
    "usage_released",
    "voucher_clawed_back",
)
REGISTRY_EVENTS = (
    "program_published",
    "voucher_issued",
    "voucher_redeemed",
    "voucher_released",
    "heartbeat",
    # Recorded, not projected: the city's ledger keeps the bindings; bound
    # because cities publish it mandatory (an unbound key is an error there).
    "binding_changed",
    *REVIEW_EVENTS,
)
ROUTING_KEYS = [f"*.{event}" for event in REGISTRY_EVENTS]


def split_routing_key(routing_key: str) -> tuple[str, str] | None:
    """``shanghai.voucher_issued`` → ``("shanghai", "voucher_issued")``.

    None when the key is not ``<city>.<event>`` with an event the registry reads.
    """
    parts = routing_key.split(".")
    if len(parts) != 2:
        return None
    city, event = parts
    if not CITY_CODE.match(city) or event not in REGISTRY_EVENTS:
        return None
    return city, event


class RejectedEvent(ValueError):
    """A federation message the registry drops (it is logged, not retried)."""


def decode_event(routing_key: str, body: bytes) -> tuple[str, dict[str, Any]]:
    """Routing key and body bytes → ``(event, loaded body)``, or RejectedEvent.

    The routing key names the publishing city (RabbitMQ topic permissions
    allow a city only ``<its code>.*``), so a body naming another city is
    refused: no city can move another's figures.
    """
    parsed = split_routing_key(routing_key)
    if parsed is None:
        raise RejectedEvent(f"routing key {routing_key!r} is not <city>.<event>")
    key_city, event = parsed
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RejectedEvent(f"{routing_key}: body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RejectedEvent(f"{routing_key}: body is not a JSON object")
    try:
        loaded = load_event(event, data)
    except ValidationError as exc:
        raise RejectedEvent(f"{routing_key}: {exc.messages}") from exc
    _check_lengths(routing_key, loaded)
    if loaded["city"] != key_city:
        raise RejectedEvent(
            f"{routing_key}: body names city {loaded['city']!r}, "
            f"routing key {key_city!r}"
        )
    return event, loaded


def check_voucher_prefix(
    event: str, body: Mapping[str, Any], assigned: str | None
) -> None:
    """Refuse (RejectedEvent) an event that claims a prefix not its city's.

    ``assigned`` is the prefix the registry reserved for the city at
    admission (None: it has none). A ``program_published`` may name the
    prefix, and then must name that one; an event about a voucher must be
    about a well-formed code of that prefix. A city publishing another's
    prefix would otherwise be announcing that city's vouchers as its own.
    """
    where = f"{body['city']}.{event}"
    claimed = body.get("voucher_prefix")
    if claimed is not None and claimed != assigned:
        raise RejectedEvent(
            f"{where}: voucher_prefix {claimed!r} is not the city's assigned "
            f"prefix {assigned!r}"
        )
    code = body.get("voucher_code")
    if code is None:
        return
    try:
        prefix = vouchercode.parse(code)
    except vouchercode.InvalidVoucherCode as exc:
        raise RejectedEvent(f"{where}: {exc}") from None
    if prefix != assigned:
        raise RejectedEvent(
            f"{where}: voucher {code} has prefix {prefix!r}, the city's assigned "
            f"prefix is {assigned!r}"
        )


# Column widths of models.py: a longer value would fail the insert on every
# redelivery, so it is refused here instead of looping through the queue.
_MAX_LENGTHS = {
    "city": 64,
    "event_id": 128,
    "voucher_code": 64,
    "program_id": 128,
    "id": 128,
    "name": 200,
    "region": 64,
    "voucher_prefix": 8,
    "rules_version": 64,
    "record_id": 128,
    "datacenter_id": 64,
    "actor": 128,
}


def _check_lengths(routing_key: str, body: Mapping[str, Any]) -> None:
    items = [body, *(body.get("programs") or [])]
    for item in items:
        for key, limit in _MAX_LENGTHS.items():
            value = item.get(key)
            if isinstance(value, str) and len(value) > limit:
                raise RejectedEvent(f"{routing_key}: {key} longer than {limit}")


# How one federation event moves the figures of a program and its city: the
# same figures as theirs, each the difference the event makes.
LedgerDelta = Figures


def ledger_delta(event: str, body: Mapping[str, Any]) -> LedgerDelta:
    """The effect of a loaded federation event on the read model.

    Issuing commits the face value; a redemption moves the subsidy from
    committed to redeemed (negative for the reversal half of a correction);
    a release returns the unspent balance to the budget.
    """
    if event == "voucher_issued":
        face = body["face_value_fen"]
        return LedgerDelta(committed_fen=face, vouchers_issued=1)
    if event == "voucher_redeemed":
        subsidy = body["subsidy_fen"]
        return LedgerDelta(committed_fen=-subsidy, redeemed_fen=subsidy)
    if event == "voucher_released":
        released = body["released_fen"]
        return LedgerDelta(committed_fen=-released, released_fen=released)
    return LedgerDelta()


def heartbeat_moment(occurred_at: datetime, received_at: datetime) -> datetime:
    """When a heartbeat says the city was alive: its own time, never in our future.

    A city's clock may run ahead of ours; the store keeps the latest moment
    seen, so a backlog of old heartbeats replayed after an outage does not move
    ``last_heartbeat_at`` backwards.
    """
    return min(occurred_at, received_at)


def program_terms(program: Mapping[str, Any]) -> dict[str, Any] | None:
    """The optional terms a ``program_published`` program carries, or None."""
    terms = {
        key: program.get(key)
        for key in TERMS_ON_THE_WIRE
        if program.get(key) is not None
    }
    return terms or None
