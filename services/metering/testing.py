"""Test data for metering (used by its unit and integration tests): a registered
data centre, its signing key, usage records and signed messages.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from nameko import config as nameko_config
from nameko.rpc import rpc

from services.common import signing, vouchercode
from services.common.amqp import RawMessage
from services.common.contracts import canonical_json
from services.common.errors import EXPECTED, NotFound
from services.common.units import format_ts, utcnow

DATACENTER_ID = "guian-gov-01"
KEY_ID = "guian-gov-01-k1"
SECRET = "s3cret-key"
PRICE_H800 = 1800
DATACENTER = {
    "id": DATACENTER_ID,
    "name": "Gui'an Government Computing Centre",
    "city": "guiyang",
    "hub_region": "west",
    "government_run": True,
    "inventory": [
        {
            "gpu_model": "H800",
            "count": 256,
            "chip_origin": "imported",
            "price_fen_per_gpu_hour": PRICE_H800,
        },
        {
            "gpu_model": "Ascend-910B",
            "count": 512,
            "chip_origin": "domestic",
            "price_fen_per_gpu_hour": 1100,
        },
    ],
}
PREFIXES = {"SH": "shanghai", "CD": "chengdu"}


def voucher(prefix: str = "SH") -> str:
    return vouchercode.generate(prefix)


def usage(**overrides: Any) -> dict[str, Any]:
    end = utcnow().replace(microsecond=0) - timedelta(minutes=1)
    start = end - timedelta(hours=1)
    record = {
        "record_id": f"rec-{uuid.uuid4().hex[:12]}",
        "datacenter_id": DATACENTER_ID,
        "tenant_id": "tenant-a",
        "voucher_code": None,
        "gpu_model": "H800",
        "gpu_count": 2,
        "started_at": format_ts(start),
        "ended_at": format_ts(end),
        "gpu_seconds": 7200,
        "source": "slurm",
        "job_id": "4242",
        "correction_of": None,
    }
    record.update(overrides)
    return record


def capacity(reported_at, total: int = 100, allocated: int = 30) -> dict[str, Any]:
    return {
        "datacenter_id": DATACENTER_ID,
        "reported_at": format_ts(reported_at),
        "gpus": [{"model": "H800", "total": total, "allocated": allocated}],
    }


def signed_headers(body: bytes, key_id: str = KEY_ID, secret: str = SECRET) -> dict:
    return {
        signing.KEY_ID_HEADER: key_id,
        signing.SIGNATURE_HEADER: signing.sign(body, secret),
    }


def raw_message(
    payload: Any = None,
    *,
    body: bytes | None = None,
    routing_key: str | None = None,
    headers: dict | None = None,
    content_type: str = "application/json",
) -> RawMessage:
    if body is None:
        body = canonical_json(payload)
    return RawMessage(
        body=body,
        headers=signed_headers(body) if headers is None else headers,
        properties={"content_type": content_type},
        routing_key=routing_key or f"{DATACENTER_ID}.usage",
        redelivered=False,
    )


class StandInRegistry:
    """Just what metering asks city_registry, for one data centre (tests, bench)."""

    name = "city_registry"

    @rpc(expected_exceptions=EXPECTED)
    def get_datacenter(self, datacenter_id):
        if datacenter_id != DATACENTER_ID:
            raise NotFound("datacenter_not_found", datacenter_id)
        return DATACENTER

    @rpc(expected_exceptions=EXPECTED)
    def datacenter_signing_keys(self, datacenter_id):
        if datacenter_id != DATACENTER_ID:
            raise NotFound("datacenter_not_found", datacenter_id)
        return [{"key_id": KEY_ID, "secret": SECRET}]

    @rpc
    def voucher_prefixes(self):
        return PREFIXES


def run_stand_in_registry(amqp_uri: str) -> None:
    """``python -m services.metering.testing AMQP_URI``: the stand-in, as a process."""
    import eventlet

    eventlet.monkey_patch()
    from nameko.runners import ServiceRunner

    nameko_config.setup({"AMQP_URI": amqp_uri})
    runner = ServiceRunner()
    runner.add_service(StandInRegistry)
    runner.start()
    runner.wait()


if __name__ == "__main__":
    import sys

    run_stand_in_registry(sys.argv[1])
