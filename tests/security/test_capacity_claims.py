"""A dishonest data centre claims more GPU-hours than it has (DESIGN.md §9,
"inventory and capacity"; issue 15): each of its records names no more GPUs
than it registered (so none is ``exceeds_inventory``), but together they
claim its 8 H800s three times over in one hour, and two of them name the
same GPUs at the same time. Beside it an honest data centre's records of
the same tenant and voucher. metering (real, on RabbitMQ and PostgreSQL) and
the city (real) run: the honest records are booked, the dishonest records
over the line are held (``list_held``), and the voucher paid for none of
them."""

from __future__ import annotations

from datetime import timedelta

import nameko
import pytest
from kombu import Connection, Queue, binding
from nameko.rpc import rpc

from services.common import signing
from services.common.amqp import FEDERATION_EXCHANGE
from services.common.config import (
    AMQP_URI,
    CITY_CODE,
    DATABASE_URL,
    HEARTBEAT_INTERVAL_S,
    REGISTRY_CACHE_TTL_S,
    RULES_FILE,
)
from services.common.contracts import canonical_json
from services.common.errors import EXPECTED, NotFound
from services.common.rpc_access import caller_options
from services.common.units import format_ts, utcnow
from services.metering.domain.rollups import hour_of
from services.metering.service import MeteringService
from services.vouchers.service import OUTBOX_INTERVAL_S, build
from tests.support.metering_data import (
    DATACENTER,
    DATACENTER_ID,
    KEY_ID,
    SECRET,
    StandInRegistry,
    publish_usage,
    usage,
)
from tests.support.polling import eventually
from tests.support.vouchers_books import consent_by_rpc
from tests.support.vouchers_data import SHANGHAI_RULES, application

pytestmark = pytest.mark.integration

GHOST = "ghost-dc-01"
GHOST_KEY, GHOST_SECRET = "ghost-dc-01-k1", "ghost-secret"
GHOST_DATACENTER = {
    **DATACENTER,
    "id": GHOST,
    "name": "Ghost Computing",
    "government_run": False,
    "inventory": [
        {
            "gpu_model": "H800",
            "count": 8,
            "chip_origin": "imported",
            "price_fen_per_gpu_hour": 1800,
        }
    ],
}
DATACENTERS = {DATACENTER_ID: DATACENTER, GHOST: GHOST_DATACENTER}
KEYS = {DATACENTER_ID: (KEY_ID, SECRET), GHOST: (GHOST_KEY, GHOST_SECRET)}
TENANT = "tenant-a"


class TwoDatacenters(StandInRegistry):
    """The registry as metering asks it: an honest and a dishonest member."""

    @rpc(expected_exceptions=EXPECTED)
    def get_datacenter(self, datacenter_id):
        if datacenter_id not in DATACENTERS:
            raise NotFound("datacenter_not_found", datacenter_id)
        return DATACENTERS[datacenter_id]

    @rpc(expected_exceptions=EXPECTED)
    def datacenter_signing_keys(self, datacenter_id):
        if datacenter_id not in KEYS:
            raise NotFound("datacenter_not_found", datacenter_id)
        key_id, secret = KEYS[datacenter_id]
        return [{"key_id": key_id, "secret": secret}]


@pytest.fixture
def network(rabbit_config, metering_db, vouchers_db, container_factory, tmp_path):
    """metering (beside the two-member registry) and Shanghai, running."""
    container_factory(TwoDatacenters).start()
    with Connection(nameko.config[AMQP_URI]) as connection:
        # where the registry would take the city's events (mandatory ones)
        Queue(
            "test.registry_sink",
            bindings=[binding(FEDERATION_EXCHANGE, routing_key="#")],
            auto_delete=False,
        )(connection.channel()).declare()
    with nameko.config.patch({DATABASE_URL: metering_db, REGISTRY_CACHE_TTL_S: 30}):
        container_factory(MeteringService).start()
    rules = tmp_path / "shanghai.yaml"
    rules.write_text(SHANGHAI_RULES)
    config = {
        DATABASE_URL: vouchers_db,
        CITY_CODE: "shanghai",
        RULES_FILE: str(rules),
        HEARTBEAT_INTERVAL_S: 1,
        OUTBOX_INTERVAL_S: 0.3,
    }
    with nameko.config.patch(config):
        city_cls = build(dict(nameko.config))
    container_factory(city_cls, config).start()
    from nameko.standalone.rpc import ClusterRpcClient

    client = ClusterRpcClient(timeout=10, **caller_options())
    yield client.start()
    client.stop()


def send(connection, datacenter_id: str, record: dict) -> None:
    body = canonical_json({**record, "datacenter_id": datacenter_id})
    key_id, secret = KEYS[datacenter_id]
    publish_usage(
        connection,
        body,
        routing_key=f"{datacenter_id}.usage",
        headers={
            signing.KEY_ID_HEADER: key_id,
            signing.SIGNATURE_HEADER: signing.sign(body, secret),
        },
    )


def hour_record(record_id: str, start, gpus: int, code: str, **extra) -> dict:
    return usage(
        record_id=record_id,
        tenant_id=TENANT,
        voucher_code=code,
        gpu_count=gpus,
        started_at=format_ts(start),
        ended_at=format_ts(start + timedelta(hours=1)),
        gpu_seconds=gpus * 3600,
        **extra,
    )


def test_a_data_centre_claiming_more_gpu_hours_than_it_has_is_held_not_paid(
    network, vouchers_db
):
    city = network.vouchers_shanghai
    code = city.apply(application())["voucher"]["code"]
    consent_by_rpc(
        city, vouchers_db, code, tenants=[(DATACENTER_ID, TENANT), (GHOST, TENANT)]
    )
    hour = hour_of(utcnow()) - timedelta(hours=3)
    honest = [hour_record(f"honest-{n}", hour, 8, code) for n in range(3)]
    # The ghost's 8 GPUs, all of them, three times in one hour: the first
    # (in the canonical order: started_at, record_id) fits, two are over.
    ghost = [hour_record(f"ghost-{n}", hour, 8, code) for n in range(3)]
    # and two records, an hour later, naming the same GPU at once
    later = hour + timedelta(hours=1)
    twins = [
        hour_record(f"twin-{n}", later, 1, code, gpu_uuids=["GPU-7f1c"])
        for n in range(2)
    ]
    with Connection(nameko.config[AMQP_URI]) as connection:
        for record in honest:
            send(connection, DATACENTER_ID, record)
        for record in [*reversed(ghost), *twins]:  # in any order
            send(connection, GHOST, record)

    per_hour = 8 * 1800 * 80 // 100  # 8 H800-hours at 18.00 CNY, at 80 %
    paid = 4 * per_hour  # the honest three and the ghost's one that fits

    def decided():
        held = city.list_held()["items"]
        redeemed = city.get_voucher(code)["redeemed_fen"]
        return held if len(held) >= 4 and redeemed == paid else None

    held = eventually(decided, timeout=30)
    assert {(h["datacenter_id"], h["record_id"], h["reason"]) for h in held} == {
        (GHOST, "ghost-1", "over_capacity"),
        (GHOST, "ghost-2", "over_capacity"),
        (GHOST, "twin-0", "double_claim"),
        (GHOST, "twin-1", "double_claim"),
    }
    lines = city.list_redemptions(code)["items"]
    booked = {
        (line["datacenter_id"], line["record_id"])
        for line in lines
        if line["status"] == "booked"
    }
    # A ghost record booked before the one that sorts earlier came is
    # reversed by its usage_hold (held retroactively): paid nothing in the end.
    honest_ids = {(DATACENTER_ID, r["record_id"]) for r in honest}
    assert honest_ids | {(GHOST, "ghost-0")} <= booked
    assert city.get_voucher(code)["redeemed_fen"] == paid
