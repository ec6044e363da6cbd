"""A data centre's binding request (CONTRACTS.md §6) as metering judges it (no I/O).

A data centre asks, on ``<datacenter_id>.binding``, to bill a tenant's records
to a voucher (``request``) or stops asking (``cancel``); the voucher's holder
decides, in its city. metering checks the request as it checks a usage
record, and the first rule it breaks is its dead-letter reason:

1. the envelope (``schema``), the publishing broker user
   (``wrong_publisher``), the data centre (``unknown_datacenter``) and the
   signature (``bad_signature``): the same rules as a usage record's,
   ``services.metering.ingest``;
2. the body loads through ``contracts.BindingRequestSchema``: ``request_id``
   1–128 characters, ``tenant_id`` 1–128, a well-formed ``voucher_code``,
   ``action`` ``request`` | ``cancel``, ``requested_at`` not in the future
   (``schema``);
3. its ``datacenter_id`` is the routing key's (``datacenter_mismatch``);
4. the voucher's prefix names an admitted city (``unknown_voucher``).

A request that passes becomes ``<city>.binding_requested`` on
``computenet.federation``. Its ``event_id`` is derived from
``(datacenter_id, request_id)`` and its ``occurred_at`` is the request's
time, so a redelivered request is the same event, byte for byte, and the
city applies it once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError

from services.common import contracts
from services.metering.domain.validation import Reason, Refused

BINDING = "binding"  # the routing key's kind: <datacenter_id>.binding
EVENT = "binding_requested"

_REQUEST_SCHEMA = contracts.BindingRequestSchema()
_EVENT_SCHEMA = contracts.EVENT_SCHEMAS[EVENT]()


def load_request(data: Mapping[str, Any], routing_datacenter_id: str) -> dict[str, Any]:
    """The request through its contract, or :class:`Refused`."""
    try:
        request = _REQUEST_SCHEMA.load(data)
    except ValidationError as exc:
        raise Refused(Reason.SCHEMA, exc.messages) from exc
    except OverflowError as exc:  # a timestamp before year 1 in UTC
        raise Refused(Reason.SCHEMA, f"a timestamp is out of range: {exc}") from exc
    if request["datacenter_id"] != routing_datacenter_id:
        raise Refused(
            Reason.DATACENTER_MISMATCH,
            f"datacenter_id {request['datacenter_id']!r} but routing key names "
            f"{routing_datacenter_id[:64]!r}",
        )
    return request


def event_id(datacenter_id: str, request_id: str) -> str:
    """The event of one request: the same whenever it is delivered."""
    return contracts.event_id(EVENT, datacenter_id, request_id)


def binding_requested(city: str, request: Mapping[str, Any]) -> tuple[str, str, bytes]:
    """``(routing key, event id, body)`` of the city's ``binding_requested``."""
    eid = event_id(request["datacenter_id"], request["request_id"])
    body = _EVENT_SCHEMA.dump(
        {
            "event_id": eid,
            "city": city,
            "occurred_at": request["requested_at"],
            "voucher_code": request["voucher_code"],
            "datacenter_id": request["datacenter_id"],
            "tenant_id": request["tenant_id"],
            "action": request["action"],
            "requested_at": request["requested_at"],
        }
    )
    return f"{city}.{EVENT}", eid, contracts.canonical_json(body)


def readable_request_id(body: bytes) -> str | None:
    """The ``request_id`` of a refused body, when it has a usable one: what
    its dead letter is listed and recognised by."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    request_id = data.get("request_id") if isinstance(data, dict) else None
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= 128:
        return None
    if "\x00" in request_id:
        return None
    try:
        request_id.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return request_id
