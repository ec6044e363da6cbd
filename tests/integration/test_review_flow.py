"""Refusals, holds, releases and clawbacks across the network (issue 15):
the city (``vouchers_shanghai``), the registry and the portal on a real
RabbitMQ and real PostgreSQL databases; metering is a stand-in that lists no
dead letters of its own.

- a record the city refuses is published (``usage_refused``), kept by the
  registry, and listed in ``GET /api/v1/dead-letters`` for its data centre
  (and not for another);
- a held record books nothing until its city's staff release it; then the
  national view's redeemed figure follows;
- a clawback by the national admin moves the national figure back;
- a ``usage_hold`` on the city's queue reverses a booked record's subsidy.
"""

from __future__ import annotations

from pathlib import Path

import nameko
import pytest
from kombu import Connection
from nameko.standalone.rpc import ClusterRpcClient

from gateway.app import create_app
from services.city_registry.service import CityRegistryService
from services.common import vouchercode
from services.common.amqp import FEDERATION_EXCHANGE, federation_key
from services.common.config import (
    AMQP_URI,
    CITY_CODE,
    DATABASE_URL,
    DEPLOY_DIR,
    HEARTBEAT_INTERVAL_S,
    RULES_FILE,
    STALE_AFTER_S,
)
from services.common.contracts import make_event
from services.common.migrations import upgrade
from services.common.rpc import RpcPool
from services.common.rpc_access import caller_options, rpc
from services.vouchers.service import OUTBOX_INTERVAL_S, build
from tests.support.polling import eventually
from tests.support.vouchers_books import consent_by_rpc
from tests.support.vouchers_data import EAST_COMMERCIAL as COMMERCIAL
from tests.support.vouchers_data import (
    SHANGHAI_RULES,
    application,
    publish_usage_rated,
    rated,
)

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DC = "dc-test-01"  # rated()'s data centre
HOLD = {"reason": "over_capacity", "evidence": {"inventory": 8, "hour": "x"}}


class StandInMetering:
    """metering, as far as the registry and the portal ask it here."""

    name = "metering"

    @rpc
    def usage_overview(self, window_hours=24):
        return {"datacenters": {}}

    @rpc
    def list_dead_letters(self, datacenter_id=None, reason=None, limit=100):
        return []


@pytest.fixture
def network(rabbit_config, pg_url_factory, vouchers_db, container_factory, tmp_path):
    """The registry, the city and a stand-in metering, running; an RPC client."""
    registry_db = pg_url_factory("city_registry")
    upgrade("city_registry", registry_db)
    container_factory(
        CityRegistryService,
        {DATABASE_URL: registry_db, DEPLOY_DIR: str(DEPLOY), STALE_AFTER_S: 60},
    ).start()
    container_factory(StandInMetering, {}).start()
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
    client = ClusterRpcClient(timeout=10, **caller_options())
    yield client.start()
    client.stop()


@pytest.fixture
def portal(network):
    pool = RpcPool(nameko.config[AMQP_URI])
    app = create_app({"AMQP_URI": nameko.config[AMQP_URI], "rpc": pool})
    tokens = {}

    def headers(role: str) -> dict[str, str]:
        if role not in tokens:
            tokens[role] = network.city_registry.issue_token(role)
        return {"Authorization": f"Bearer {tokens[role]}"}

    yield app.test_client(), headers
    pool.close()


def _redeemed(network) -> int:
    return network.city_registry.get_city("shanghai")["redeemed_fen"]


def test_a_refusal_reaches_the_registry_and_its_data_centres_dead_letters(
    network, portal
):
    client, headers = portal
    stranger = vouchercode.generate("SH")  # never issued: unknown_voucher
    with Connection(nameko.config[AMQP_URI]) as connection:
        publish_usage_rated(
            connection, rated(stranger, "rec-refused", 10_000, COMMERCIAL)
        )

    def listed():
        found = network.city_registry.list_city_refusals(datacenter_id=DC)
        return found["items"] if found["total"] else None

    [refusal] = eventually(listed, timeout=20)
    assert (refusal["record_id"], refusal["reason"]) == (
        "rec-refused",
        "unknown_voucher",
    )

    own = client.get("/api/v1/dead-letters", headers=headers(f"datacenter:{DC}"))
    other = client.get(
        "/api/v1/dead-letters", headers=headers("datacenter:dc-other-01")
    )
    assert own.status_code == 200, own.get_json()
    [item] = own.get_json()["items"]
    assert item["source"] == "shanghai" and item["id"] == f"city:{refusal['id']}"
    assert item["reason"] == "unknown_voucher"
    assert other.status_code == 200 and other.get_json()["items"] == []


def test_a_held_record_released_books_and_a_clawback_takes_it_back(
    network, portal, vouchers_db
):
    client, headers = portal
    city = network.vouchers_shanghai
    code = city.apply(application())["voucher"]["code"]
    consent_by_rpc(city, vouchers_db, code)
    with Connection(nameko.config[AMQP_URI]) as connection:
        publish_usage_rated(
            connection, rated(code, "rec-held", 10_000, COMMERCIAL, hold=HOLD)
        )

    def held():
        found = network.city_registry.list_city_holds(datacenter_id=DC, status="held")
        return found["items"] or None

    [hold] = eventually(held, timeout=20)
    assert hold["evidence"] == HOLD["evidence"] and hold["subsidy_fen"] > 0
    assert city.get_voucher(code)["redeemed_fen"] == 0

    staff = headers("city_admin:shanghai")
    queue = client.get("/api/v1/cities/shanghai/held", headers=staff)
    assert queue.status_code == 200 and queue.get_json()["total"] == 1
    decided = client.post(
        f"/api/v1/cities/shanghai/held/{DC}/rec-held/decision",
        json={"decision": "release", "reason": "capacity confirmed"},
        headers=staff,
    )
    assert decided.status_code == 200, decided.get_json()
    assert decided.get_json()["status"] == "released"
    again = client.post(
        f"/api/v1/cities/shanghai/held/{DC}/rec-held/decision",
        json={"decision": "release", "reason": "twice"},
        headers=staff,
    )
    assert again.status_code == 409
    subsidy = city.get_voucher(code)["redeemed_fen"]
    assert subsidy == hold["subsidy_fen"]
    eventually(lambda: _redeemed(network) == subsidy, timeout=20)

    clawed = client.post(
        f"/api/v1/vouchers/{code}/clawbacks",
        json={"datacenter_id": DC, "record_id": "rec-held", "reason": "ghost job"},
        headers=headers("national_admin"),
    )
    assert clawed.status_code == 201, clawed.get_json()
    assert clawed.get_json()["clawed_back_fen"] == subsidy
    assert city.get_voucher(code)["redeemed_fen"] == 0
    eventually(lambda: _redeemed(network) == 0, timeout=20)
    statuses = [line["status"] for line in city.list_redemptions(code)["items"]]
    assert statuses == ["booked", "clawed_back"]


def test_a_hold_after_booking_reverses_it_in_the_national_view(network, vouchers_db):
    city = network.vouchers_shanghai
    code = city.apply(application())["voucher"]["code"]
    consent_by_rpc(city, vouchers_db, code)
    with Connection(nameko.config[AMQP_URI]) as connection:
        publish_usage_rated(connection, rated(code, "rec-late", 10_000, COMMERCIAL))
        booked = eventually(lambda: city.get_voucher(code)["redeemed_fen"], timeout=20)
        eventually(lambda: _redeemed(network) == booked, timeout=20)
        hold = make_event(
            "usage_hold",
            "shanghai",
            "hold-rec-late",
            record_id="rec-late",
            datacenter_id=DC,
            voucher_code=code,
            hold={"reason": "double_claim", "evidence": {"records": ["rec-other"]}},
        )
        connection.Producer().publish(
            hold,
            exchange=FEDERATION_EXCHANGE,
            routing_key=federation_key("shanghai", "usage_hold"),
            serializer="json",
            delivery_mode=2,
        )
    eventually(lambda: city.get_voucher(code)["redeemed_fen"] == 0, timeout=20)
    eventually(lambda: _redeemed(network) == 0, timeout=20)
    [held] = city.list_held()["items"]
    assert (held["record_id"], held["retroactive"]) == ("rec-late", True)
