"""The voucher service's review entrypoints (a mixin of ``VouchersService``):
the review queue, its decisions and clawbacks by RPC, and the ``usage_hold``
messages metering sends on the city's usage queue. The ledger's side is
``ledger/review.py`` (the queue) and ``ledger/clawback.py``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import eventlet

from services.common.amqp import RawMessage, federation_key
from services.common.contracts import load_event
from services.common.errors import EXPECTED, InvalidRequest
from services.common.rpc_access import rpc
from services.vouchers.ledger.review import held_view
from services.vouchers.schemas import HeldUsageSchema

log = logging.getLogger(__name__)

USAGE_HOLD = "usage_hold"
_HELD = HeldUsageSchema()


def _text(value: Any, name: str, max_length: int = 512) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise InvalidRequest(
            "invalid_request", f"{name} must be a non-empty string", {name: [value]}
        )
    return value.strip()


def is_hold(message: RawMessage) -> bool:
    """Whether a message of the usage queue is a ``<city>.usage_hold``."""
    return message.routing_key.endswith("." + USAGE_HOLD)


def load_hold(message: RawMessage) -> dict:
    """A ``usage_hold`` of the usage queue, loaded; ``ValueError`` or
    ``ValidationError`` if it is not of the contract (it is then parked)."""
    return load_event(USAGE_HOLD, json.loads(message.body))


def _mark_when_confirmed(confirmation, marks, ids: list[int]) -> None:
    """Mark outbox events published once the broker confirmed them; if it
    did not, the relay publishes them again (with the same ids)."""
    try:
        confirmation.wait()
    except Exception:  # noqa: BLE001 - the consumer requeues; the relay retries
        return
    marks.add(ids)


class ReviewEntrypoints:
    """RPC of the review queue and clawbacks; national callers only (the
    portal checks that the caller is the city's staff or the ministry)."""

    def outbox_items(self, rows) -> list[tuple[str, str, Any]]:
        """Committed outbox rows as ``publish_confirmed`` takes them."""
        return [
            (federation_key(self.city, row.event), row.event_id, row.body)
            for row in rows
        ]

    def publish_with_outbox(self, events: list, rows: list) -> Any:
        """Publish a batch's ``voucher_redeemed`` and its outbox rows (refusals,
        holds) in one confirmed call; the rows are marked once confirmed."""
        confirmation = self.publish_confirmed([*events, *self.outbox_items(rows)])
        if rows:
            eventlet.spawn_n(
                _mark_when_confirmed,
                confirmation,
                self.outbox_marks,
                [row.id for row in rows],
            )
        return confirmation

    def apply_holds(self, holds: list[dict]) -> list:
        """Loaded ``usage_hold`` messages (``load_hold``), each in its own
        transaction; their outbox rows (reversals, ``usage_held``)."""
        rows = []
        for body in holds:
            rows.extend(self.ledger.hold_booked(body))
        return rows

    @rpc(expected_exceptions=EXPECTED)
    def list_held(
        self, status: str | None = "held", limit: int = 100, offset: int = 0
    ) -> dict:
        """The review queue (``status`` held; released, refused, None: all),
        oldest first, each with its evidence and what it would book."""
        items, total = self.ledger.list_held(status, limit, offset)
        return {"items": _HELD.dump(items, many=True), "total": total}

    @rpc(expected_exceptions=EXPECTED)
    def decide_held(
        self,
        datacenter_id: str,
        record_id: str,
        decision: str,
        reason: str,
        actor: str,
    ) -> dict:
        """Release (book, if the voucher still can) or refuse a held record."""
        row, events = self.ledger.decide_held(
            _text(datacenter_id, "datacenter_id", 64),
            _text(record_id, "record_id", 128),
            decision,
            _text(reason, "reason"),
            _text(actor, "actor", 128),
        )
        self._publish_outbox(events)
        return _HELD.dump(held_view(row))

    @rpc(expected_exceptions=EXPECTED)
    def claw_back(
        self,
        datacenter_id: str,
        record_id: str,
        reason: str,
        actor: str,
        voucher_code: str | None = None,
    ) -> dict:
        """Reverse a booked subsidy; with ``voucher_code``, only if the record
        was booked on that voucher (``redemption_not_found`` otherwise)."""
        result, events = self.ledger.claw_back(
            _text(datacenter_id, "datacenter_id", 64),
            _text(record_id, "record_id", 128),
            _text(reason, "reason"),
            _text(actor, "actor", 128),
            voucher_code,
        )
        self._publish_outbox(events)
        return result
