"""Test data of the federation: what cities announce on the bus."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from kombu import Connection

from services.common.amqp import FEDERATION_EXCHANGE, federation_key
from services.common.contracts import make_event
from services.common.units import utcnow


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


def publish_events(uri: str, events: list[tuple[str, dict]]) -> None:
    """Publish ``(routing_key, body)`` federation events as a city's service
    would (persistent JSON, its event id as message id), with confirms."""
    with Connection(uri, transport_options={"confirm_publish": True}) as connection:
        producer = connection.Producer()
        for routing_key, body in events:
            producer.publish(
                json.dumps(body).encode(),
                exchange=FEDERATION_EXCHANGE,
                routing_key=routing_key,
                content_type="application/json",
                delivery_mode=2,
                message_id=body.get("event_id"),
                retry=True,
            )


def voucher_issued(city: str, eid: str, code: str, face_fen: int) -> tuple[str, dict]:
    """``(routing key, body)`` of ``<city>.voucher_issued``: ``code`` of the
    city's compute program, worth ``face_fen``, expiring in a year."""
    body = make_event(
        "voucher_issued",
        city,
        eid,
        voucher_code=code,
        program_id=f"{city}-compute",
        face_value_fen=face_fen,
        expires_at=utcnow() + timedelta(days=365),
    )
    return federation_key(city, "voucher_issued"), body
