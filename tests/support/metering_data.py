"""Test data for metering (its unit and integration tests, the benches): a
registered data centre, its signing key, usage records and signed messages, and
the registry that knows them, in process (:class:`FakeRegistry`) or as a nameko
service (:class:`StandInRegistry`, also a process: ``python -m
tests.support.metering_data AMQP_URI``).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from kombu import Exchange
from nameko import config as nameko_config
from nameko.rpc import rpc

from services.common import signing, vouchercode
from services.common.amqp import USAGE_EXCHANGE, RawMessage, SharedTopology
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
    """A well-formed voucher code of the city with ``prefix``, never issued."""
    return vouchercode.generate(prefix)


def usage(**overrides: Any) -> dict[str, Any]:
    """A usage record as :data:`DATACENTER_ID` sends it (random ``record_id``)."""
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
    """A capacity report of :data:`DATACENTER_ID`'s H800s."""
    return {
        "datacenter_id": DATACENTER_ID,
        "reported_at": format_ts(reported_at),
        "gpus": [{"model": "H800", "total": total, "allocated": allocated}],
    }


def signed_headers(body: bytes, key_id: str = KEY_ID, secret: str = SECRET) -> dict:
    """The headers of ``body`` signed with the data centre's key."""
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
    user_id: str | None = "",
) -> RawMessage:
    """A delivery of ``payload`` (or ``body``) on ``computenet.usage``, signed,
    published by the routing key's data centre's own broker user (unless
    ``user_id`` names another; None: no user_id at all)."""
    if body is None:
        body = canonical_json(payload)
    routing_key = routing_key or f"{DATACENTER_ID}.usage"
    properties: dict[str, Any] = {"content_type": content_type}
    if user_id == "":
        user_id = "dc." + routing_key.rsplit(".", 1)[0]
    if user_id is not None:
        properties["user_id"] = user_id
    return RawMessage(
        body=body,
        headers=signed_headers(body) if headers is None else headers,
        properties=properties,
        routing_key=routing_key,
        redelivered=False,
    )


def publish_usage(
    connection,
    *bodies: bytes,
    routing_key: str | None = None,
    headers: dict | None = None,
    **properties: Any,
) -> None:
    """Publish ``bodies`` on ``computenet.usage`` as :data:`DATACENTER_ID`'s
    gateway does: persistent, JSON, each signed (unless ``headers`` are given),
    on ``<data centre>.usage`` unless ``routing_key`` says otherwise; with the
    connection's user as ``user_id``, which the broker validates."""
    properties.setdefault("content_type", "application/json")
    properties.setdefault("user_id", connection.userid or "guest")
    with connection.Producer() as producer:
        for body in bodies:
            producer.publish(
                body,
                exchange=USAGE_EXCHANGE,
                routing_key=routing_key or f"{DATACENTER_ID}.usage",
                headers=signed_headers(body) if headers is None else headers,
                delivery_mode=2,
                declare=[Exchange(USAGE_EXCHANGE.name, type="topic", durable=True)],
                **properties,
            )


def dead_letters(reason: str | None = None) -> list[dict]:
    """metering's dead letters (of ``reason``), asked over RPC as the portal
    does, in the test's vhost (nameko's config)."""
    from nameko.standalone.rpc import ServiceRpcClient

    from services.common.rpc_access import caller_options

    with ServiceRpcClient("metering", **caller_options()) as rpc:
        return rpc.list_dead_letters(reason=reason)


def parked_events(kind: str | None = None) -> list[dict]:
    """metering's parked messages (issue 16), over RPC as the portal asks."""
    from nameko.standalone.rpc import ServiceRpcClient

    from services.common.rpc_access import caller_options

    with ServiceRpcClient("metering", **caller_options()) as rpc:
        return rpc.list_parked_events(kind=kind)["items"]


class FakeRegistry:
    """What metering asks city_registry, answered in process (unit tests).

    ``calls`` lists the questions asked; ``keys`` may be rotated; a registry
    made with ``registered=False`` does not know the data centre until its
    ``registered`` is set (a data centre that registers late)."""

    def __init__(self, registered: bool = True) -> None:
        self.registered = registered
        self.calls: list[str] = []
        self.keys = [{"key_id": KEY_ID, "secret": SECRET}]

    def get_datacenter(self, datacenter_id: str) -> dict[str, Any]:
        self.calls.append("get_datacenter")
        if not self.registered or datacenter_id != DATACENTER_ID:
            raise NotFound("datacenter_not_found")
        return DATACENTER

    def datacenter_signing_keys(self, datacenter_id: str) -> list[dict[str, str]]:
        self.calls.append("datacenter_signing_keys")
        return self.keys

    def voucher_prefixes(self) -> dict[str, str]:
        self.calls.append("voucher_prefixes")
        return PREFIXES


class StandInRegistry:
    """Just what metering asks city_registry, for one data centre, as a nameko
    service (integration tests, benches)."""

    name = "city_registry"
    # As the registry does: the shared topology, and the cities' usage queues
    # (metering's usage_rated are mandatory).
    topology = SharedTopology(cities=tuple(sorted(set(PREFIXES.values()))))

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
    """``python -m tests.support.metering_data AMQP_URI``: the stand-in, as a
    process (run from the repository's root)."""
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
