"""The data-centre gateway's rules, pure Python: no Flask, no SQLAlchemy, no I/O.

- what an agent's batch must look like, and the exact bytes each record
  becomes (the bytes that are stored, signed and published);
- the signed headers of a message;
- the binding request of CONTRACTS.md §6 (the tenant's voucher, asked for);
- the capacity report of CONTRACTS.md §2;
- the relay's back-off.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from marshmallow import ValidationError

from services.common import contracts, signing, vouchercode
from services.common.contracts import (
    AgentUsageRecordSchema,
    BindingRequestSchema,
    CapacityReportSchema,
    UsageRecordSchema,
    canonical_json,
)

MAX_BATCH = 10_000


@dataclass(frozen=True)
class InventoryItem:
    gpu_model: str
    count: int


@dataclass(frozen=True)
class PreparedRecord:
    """One agent record, validated, ready for the outbox.

    ``agent_digest`` identifies what the agent sent (before the gateway added
    the tenant's voucher), so that a retried POST is recognised as the same
    record even if the tenant's voucher changed in between.
    """

    record_id: str
    tenant_id: str
    voucher_code: str | None
    fields: dict[str, Any]
    agent_digest: str

    def body(self, datacenter_id: str, tenant_voucher: str | None) -> bytes:
        """The canonical JSON the relay signs and publishes, byte for byte."""
        record = dict(self.fields, datacenter_id=datacenter_id)
        if record.get("voucher_code") is None:
            record["voucher_code"] = tenant_voucher
        return canonical_json(UsageRecordSchema().dump(record))


class InvalidBatch(ValueError):
    """The batch is not a JSON array of records; nothing was stored."""


def parse_inventory(
    datacenters: Mapping[str, Any], datacenter_id: str
) -> list[InventoryItem]:
    """This data centre's inventory from a ``datacenters.yaml`` mapping."""
    for entry in datacenters.get("datacenters") or []:
        if entry.get("id") == datacenter_id:
            return inventory_items(entry.get("inventory") or [])
    return []


def inventory_items(items: Iterable[Mapping[str, Any]]) -> list[InventoryItem]:
    return [InventoryItem(str(i["gpu_model"]), int(i["count"])) for i in items]


def normalise_voucher_code(code: str) -> str:
    """Validate a voucher code by its check character; raises InvalidVoucherCode."""
    vouchercode.parse(code)
    return code.strip().upper()


def prepare_batch(
    payload: Any,
    datacenter_id: str,
    gpu_models: Iterable[str] = (),
) -> tuple[list[PreparedRecord], dict[str, Any]]:
    """Validate an agent's batch: (records, errors by index as a string).

    All or nothing: the caller stores the records only when ``errors`` is empty.
    ``gpu_models`` is the data centre's inventory; empty means "not known here,
    let metering judge".
    """
    if not isinstance(payload, list):
        raise InvalidBatch("the body must be a JSON array of usage records")
    if len(payload) > MAX_BATCH:
        raise InvalidBatch(f"at most {MAX_BATCH} records per request")
    known_models = set(gpu_models)
    schema = AgentUsageRecordSchema()
    records: list[PreparedRecord] = []
    errors: dict[str, Any] = {}
    for index, item in enumerate(payload):
        if not isinstance(item, dict):
            errors[str(index)] = {"_schema": ["a usage record must be a JSON object"]}
            continue
        try:
            loaded = schema.load(item)
        except ValidationError as exc:
            errors[str(index)] = exc.messages
            continue
        problems: dict[str, list[str]] = {}
        given_dc = loaded.pop("datacenter_id", None)
        if given_dc is not None and given_dc != datacenter_id:
            problems["datacenter_id"] = [
                f"this gateway serves {datacenter_id!r}; leave datacenter_id out"
            ]
        if known_models and loaded["gpu_model"] not in known_models:
            problems["gpu_model"] = [
                "not in this data centre's inventory: "
                + ", ".join(sorted(known_models))
            ]
        if loaded.get("voucher_code") is not None:
            try:
                loaded["voucher_code"] = normalise_voucher_code(loaded["voucher_code"])
            except vouchercode.InvalidVoucherCode as exc:
                problems["voucher_code"] = [str(exc)]
        if problems:
            errors[str(index)] = problems
            continue
        digest = hashlib.sha256(
            canonical_json(UsageRecordSchema(exclude=("datacenter_id",)).dump(loaded))
        ).hexdigest()
        records.append(
            PreparedRecord(
                record_id=loaded["record_id"],
                tenant_id=loaded["tenant_id"],
                voucher_code=loaded.get("voucher_code"),
                fields=loaded,
                agent_digest=digest,
            )
        )
    return records, errors


def message_headers(body: bytes, key_id: str, secret: str) -> dict[str, Any]:
    """``x-key-id`` and ``x-signature`` over the exact body (CONTRACTS.md §1)."""
    return {
        signing.KEY_ID_HEADER: key_id,
        signing.SIGNATURE_HEADER: signing.sign(body, secret),
    }


REQUEST = "request"
CANCEL = "cancel"


@dataclass(frozen=True)
class BindingRequest:
    """A data centre asking for (``request``) or giving up (``cancel``) the
    voucher a tenant handed over: the voucher's holder decides on the portal.

    ``request_id`` is derived from the data centre, tenant, voucher, action and
    the moment (to the microsecond) the gateway stored it: the same stored
    request always carries the same id, so metering and the city recognise a
    redelivered or re-published copy. ``body`` is what is signed.
    """

    request_id: str
    tenant_id: str
    voucher_code: str
    action: str
    requested_at: datetime
    body: bytes


def binding_request(
    datacenter_id: str,
    tenant_id: str,
    voucher_code: str,
    action: str,
    at: datetime,
) -> BindingRequest:
    """The request and its canonical JSON (CONTRACTS.md §6), byte for byte."""
    request_id = "br-" + contracts.event_id(
        "binding", datacenter_id, tenant_id, voucher_code, action, at.isoformat()
    )
    fields = {
        "request_id": request_id,
        "datacenter_id": datacenter_id,
        "tenant_id": tenant_id,
        "voucher_code": voucher_code,
        "action": action,
        "requested_at": at,
    }
    body = canonical_json(BindingRequestSchema().dump(fields))
    return BindingRequest(request_id, tenant_id, voucher_code, action, at, body)


def capacity_report(
    datacenter_id: str,
    inventory: Iterable[InventoryItem],
    allocated: Mapping[str, int],
    now: datetime,
) -> bytes:
    """CONTRACTS.md §2 as canonical JSON; allocation capped at the inventory."""
    gpus = [
        {
            "model": item.gpu_model,
            "total": item.count,
            "allocated": max(0, min(int(allocated.get(item.gpu_model, 0)), item.count)),
        }
        for item in inventory
    ]
    report = {"datacenter_id": datacenter_id, "reported_at": now, "gpus": gpus}
    return canonical_json(CapacityReportSchema().dump(report))


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    secret: str


class SigningKeys:
    """The data centre's signing keys: one, or two during a rotation.

    The registry keeps the old key active when it issues a new one, so either
    verifies. The gateway signs with ``current`` until ``next_from`` (UTC; at
    once when not given), then with ``next``. Records are signed when
    published, not when stored, so a backlog is signed with the key in force.
    """

    def __init__(
        self,
        current: SigningKey,
        next_key: SigningKey | None = None,
        next_from: datetime | None = None,
    ):
        self.current = current
        self.next = next_key
        self.next_from = next_from

    def active(self, now: datetime) -> SigningKey:
        if self.next is not None and (self.next_from is None or now >= self.next_from):
            return self.next
        return self.current

    @property
    def key_ids(self) -> list[str]:
        return [k.key_id for k in (self.current, self.next) if k is not None]


def listens_on_loopback(host: str) -> bool:
    """Whether an HTTP server bound to ``host`` is reachable from this machine
    only (127.0.0.0/8, ::1, ``localhost``). A gateway that listens anywhere
    else must have an agent token (DESIGN.md §8): without one, anyone who can
    reach the port could claim usage in the data centre's name."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
