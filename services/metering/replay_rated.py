"""A rated record sent to its city again, marked ``replay``: an operator's
replay of a record the city refused (after its cause is fixed, e.g. the
holder authorised the tenant). The city forgets its refusal and decides
again; a record it booked stays booked once (its ledger says so).

The event is the record's ``usage_rated`` as stored (``ingest.events_of``:
what its first publication carried), with ``replay: true`` and an event id
of its own, so that each replay is one fact however often it is delivered.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy.orm import Session

from services.common.contracts import canonical_json
from services.common.errors import Conflict, InvalidRequest, NotFound
from services.metering import ingest, store


def replay_rated(
    session: Session, datacenter_id: Any, record_id: Any
) -> tuple[dict[str, Any], list[ingest.Outgoing]]:
    """``({"outcome": "sent", ...}, [its usage_rated])`` for a stored record.

    ``NotFound record_not_found`` when metering has no such record;
    ``Conflict record_not_billed`` when it names no voucher (no city took it).
    """
    for name, value in (("datacenter_id", datacenter_id), ("record_id", record_id)):
        if not isinstance(value, str) or not 1 <= len(value) <= 128:
            raise InvalidRequest("invalid_request", f"{name} must be a string")
    key = (datacenter_id, record_id)
    row = store.stored_rows(session, [key]).get(key)
    session.rollback()
    if row is None:
        raise NotFound(
            "record_not_found", f"metering has no record {datacenter_id}/{record_id}"
        )
    row = {k: store.as_utc(v) if hasattr(v, "tzinfo") else v for k, v in row.items()}
    events = ingest.events_of(row)
    if not events:
        raise Conflict(
            "record_not_billed", f"{datacenter_id}/{record_id} names no voucher"
        )
    event = events[0]
    replay_id = str(uuid.uuid4())
    body = {**json.loads(event.body), "event_id": replay_id, "replay": True}
    result = {
        "outcome": "sent",
        "city": row["city"],
        "datacenter_id": datacenter_id,
        "record_id": record_id,
        "event_id": replay_id,
    }
    return result, [ingest.Outgoing(event.routing_key, replay_id, canonical_json(body))]
