"""The voucher service's entrypoints for bindings (CONTRACTS.md §7), mixed
into ``VouchersService``: the holder's decisions by RPC (the portal checks
that the caller is the holder; the broker and ``RPC_CALLERS`` that it is the
national side), and the data centres' requests from the city's usage queue.
"""

from __future__ import annotations

import json
from typing import Any

from services.common.amqp import RawMessage
from services.common.contracts import EVENT_SCHEMAS
from services.common.errors import EXPECTED, InvalidRequest
from services.common.rpc_access import rpc
from services.vouchers.schemas import BindingSchema

BINDING_REQUESTED = "binding_requested"
_BINDING_REQUESTED = EVENT_SCHEMAS[BINDING_REQUESTED]()
_BINDING = BindingSchema()
_BINDINGS = BindingSchema(many=True)
# Column widths of models.Binding.
_WIDTHS = {"datacenter_id": 64, "tenant_id": 128, "actor": 128}


def _name(value: Any, field: str) -> str:
    """A data centre, tenant or actor as given; 400 when it is not one."""
    if (
        not isinstance(value, str)
        or not value.strip()
        or value != value.strip()
        or len(value) > _WIDTHS[field]
    ):
        raise InvalidRequest(
            "invalid_request",
            f"{field} must be a non-empty string of at most {_WIDTHS[field]} "
            "characters, without surrounding spaces",
            {field: [repr(value)[:200]]},
        )
    return value


class BindingEntrypoints:
    """``list_bindings``, ``authorise_binding``, ``withdraw_binding`` and the
    handling of ``<city>.binding_requested``; needs the service's ``ledger``,
    ``_code``, ``_publish_outbox`` and ``_voucher_view``."""

    @rpc(expected_exceptions=EXPECTED)
    def list_bindings(self, code: str) -> dict:
        """The voucher (so that the portal can check its holder) and every
        tenant asked for or authorised on it."""
        voucher, rows = self.ledger.list_bindings(self._code(code))
        return {"voucher": self._voucher_view(voucher), "items": _BINDINGS.dump(rows)}

    @rpc(expected_exceptions=EXPECTED)
    def authorise_binding(
        self, code: str, datacenter_id: str, tenant_id: str, actor: str
    ) -> dict:
        return self._decide_binding(
            self.ledger.authorise_binding, code, datacenter_id, tenant_id, actor
        )

    @rpc(expected_exceptions=EXPECTED)
    def withdraw_binding(
        self, code: str, datacenter_id: str, tenant_id: str, actor: str
    ) -> dict:
        return self._decide_binding(
            self.ledger.withdraw_binding, code, datacenter_id, tenant_id, actor
        )

    def _decide_binding(self, decide, code, datacenter_id, tenant_id, actor) -> dict:
        binding, events = decide(
            self._code(code),
            _name(datacenter_id, "datacenter_id"),
            _name(tenant_id, "tenant_id"),
            _name(actor, "actor"),
        )
        self._publish_outbox(events)
        return _BINDING.dump(binding)

    def apply_binding_requests(self, requests: list[dict]) -> None:
        """Apply loaded ``binding_requested`` events (``load_binding_request``)
        in one transaction; their ``binding_changed`` events are published
        after it (and relayed from the outbox if that fails)."""
        if requests:
            self._publish_outbox(self.ledger.apply_binding_requests(requests))


def load_binding_request(message: RawMessage) -> dict:
    """A ``binding_requested`` of the usage queue, loaded; ``ValueError`` or
    ``ValidationError`` if it is not of the contract (it is then parked)."""
    return _BINDING_REQUESTED.load(json.loads(message.body))
