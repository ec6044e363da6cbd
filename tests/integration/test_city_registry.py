"""city_registry against a real RabbitMQ vhost and a real PostgreSQL database.

Federation events are published with kombu, as a city's service would; the
national view is read over RPC, as the portal would.
"""

import time
from pathlib import Path

import pytest
from nameko import config
from nameko.rpc import rpc
from nameko.standalone.rpc import ServiceRpcClient

from services.city_registry.broker import BrokerAdmin
from services.city_registry.dependencies import VIEW_CACHE_S
from services.city_registry.service import (
    FEDERATION_QUEUE,
    CityRegistryService,
)
from services.common.amqp import federation_key
from services.common.config import DATABASE_URL, DEPLOY_DIR, STALE_AFTER_S
from services.common.contracts import make_event
from services.common.errors import InvalidRequest, NotFound
from services.common.migrations import upgrade
from services.common.rpc_access import caller_options
from services.common.vouchercode import generate
from tests.support.bus import wait_acked
from tests.support.federation_data import program, publish_events, voucher_issued
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SHA = "c" * 64


class FakeMetering:
    """Stands in for metering: the registry only needs usage_overview."""

    name = "metering"

    @rpc
    def usage_overview(self, window_hours=24):
        return {
            "datacenters": {
                "guian-gov-01": {
                    "gpu_seconds_total": 7_200,
                    "records_total": 2,
                    "cost_fen_total": 3_600,
                    "gpu_seconds_window": 3_600,
                    "capacity_gpu_seconds_window": 14_400,
                    "utilisation_window": 0.25,
                },
            }
        }


@pytest.fixture
def registry(rabbit_config, pg_url_factory, container_factory):
    url = pg_url_factory("city_registry")
    upgrade("city_registry", url)
    container = container_factory(
        CityRegistryService,
        {DATABASE_URL: url, DEPLOY_DIR: str(DEPLOY), STALE_AFTER_S: 60},
    )
    container.start()
    return container


@pytest.fixture
def registry_rpc(registry):
    with ServiceRpcClient("city_registry", timeout=10, **caller_options()) as client:
        yield client


def publish(events):
    publish_events(config["AMQP_URI"], events)


def event(kind, city, eid, **fields):
    return federation_key(city, kind), make_event(kind, city, eid, **fields)


def programs(city, budget):
    return [program(city, budget, rules_sha256=SHA)]


def redeemed(city, eid, code, subsidy):
    return event(
        "voucher_redeemed",
        city,
        eid,
        voucher_code=code,
        record_id=eid,
        datacenter_id="guian-gov-01",
        gpu_seconds=3_600,
        cost_fen=2 * abs(subsidy),
        subsidy_fen=subsidy,
    )


@pytest.fixture
def wuhan_admitted(registry_rpc, rabbit_uri):
    """Wuhan admitted with the prefix WH; its broker user deleted after."""
    admitted = registry_rpc.admit_city("wuhan", "Wuhan", voucher_prefix="WH")
    # The answer's City view is cached that long: let the test read fresh ones.
    time.sleep(VIEW_CACHE_S)
    yield admitted
    BrokerAdmin.from_config({"AMQP_URI": rabbit_uri}).delete_user("city.wuhan")


def test_national_view_projects_federation_events_once(
    registry, registry_rpc, wuhan_admitted
):
    seeded = {city["code"]: city for city in registry_rpc.list_cities()}
    assert {"shanghai", "chengdu", "shandong"} <= set(seeded)
    assert seeded["shanghai"]["status"] == "unknown"
    assert registry_rpc.voucher_prefixes()["SH"] == "shanghai"
    assert wuhan_admitted["city"]["voucher_prefix"] == "WH"
    sh1, sh2, wh1 = (generate(p) for p in ("SH", "SH", "WH"))

    events = [
        event(
            "program_published",
            "shanghai",
            "sh-p",
            programs=programs("shanghai", 1_000_000),
        ),
        event("heartbeat", "shanghai", "sh-h", version="1", uptime_s=5),
        voucher_issued("shanghai", "sh-i1", sh1, 300_000),
        voucher_issued("shanghai", "sh-i1", sh1, 300_000),  # redelivered: same event_id
        voucher_issued("shanghai", "sh-i2", sh2, 200_000),
        redeemed("shanghai", "sh-r1", sh1, 50_000),
        redeemed("shanghai", "sh-r2", sh1, -10_000),  # correction reversal
        event(
            "voucher_released",
            "shanghai",
            "sh-x1",
            voucher_code=sh2,
            released_fen=200_000,
            reason="expired",
        ),
        # a city admitted later, with its own name, region and (reserved) prefix
        event(
            "program_published",
            "wuhan",
            "wh-p",
            name="Wuhan",
            region="central",
            voucher_prefix="WH",
            programs=programs("wuhan", 500_000),
        ),
        voucher_issued("wuhan", "wh-i1", wh1, 100_000),
        # a body naming another city than its routing key: dropped
        (
            federation_key("shanghai", "voucher_issued"),
            voucher_issued("wuhan", "x", generate("WH"), 1)[1],
        ),
    ]
    publish(events)

    def settled():
        cities = {city["code"]: city for city in registry_rpc.list_cities()}
        wuhan = cities.get("wuhan")
        shanghai = cities["shanghai"]
        done = (
            wuhan is not None
            and wuhan["committed_fen"] == 100_000
            and shanghai["released_fen"] == 200_000
            and shanghai["redeemed_fen"] == 40_000
        )
        return cities if done else None

    cities = eventually(settled, 10, "every event projected")
    assert cities, registry_rpc.list_cities()
    # Every event handled and acked: a wrongly counted duplicate shows below.
    wait_acked(config["AMQP_URI"], FEDERATION_QUEUE, len(events))
    shanghai = registry_rpc.get_city("shanghai")
    assert shanghai["status"] == "live"
    assert shanghai["budget_fen"] == 1_000_000
    assert shanghai["vouchers_issued"] == 2
    assert shanghai["committed_fen"] == 300_000 + 200_000 - 40_000 - 200_000
    assert shanghai["redeemed_fen"] == 40_000
    assert shanghai["available_fen"] == 1_000_000 - 260_000 - 40_000
    (program,) = shanghai["programs"]
    assert program["committed_fen"] == 260_000 and program["redeemed_fen"] == 40_000

    wuhan = registry_rpc.get_city("wuhan")
    assert (wuhan["name"], wuhan["region"], wuhan["status"]) == (
        "Wuhan",
        "central",
        "unknown",
    )
    assert registry_rpc.voucher_prefixes()["WH"] == "wuhan"

    # no metering running: money still answered, usage unknown
    summary = registry_rpc.network_summary()
    assert summary["cities"] == len(cities) and summary["live_cities"] == 1
    assert summary["budget_fen"] == 1_500_000
    assert summary["committed_fen"] == 260_000 + 100_000
    assert summary["redeemed_fen"] == 40_000
    assert summary["released_fen"] == 200_000
    assert summary["available_fen"] == 1_500_000 - 360_000 - 40_000
    assert summary["gpu_seconds"] is None and summary["utilisation"] is None
    assert summary["datacenters"] == 2
    assert summary["regions"]["west"]["gpus"] == 768

    # What the portal holds in memory: the same, in one answer.
    public = registry_rpc.public_view()
    assert public["summary"] == summary
    assert {city["code"]: city for city in public["cities"]} == {
        code: registry_rpc.get_city(code) for code in cities
    }


def test_utilisation_comes_from_metering(registry, registry_rpc, container_factory):
    container_factory(FakeMetering).start()
    summary = registry_rpc.network_summary()
    assert summary["gpu_seconds"] == 7_200
    assert summary["utilisation"] == pytest.approx(0.25)
    assert summary["regions"]["west"]["utilisation"] == pytest.approx(0.25)
    assert summary["regions"]["east"]["utilisation"] is None
    assert registry_rpc.get_datacenter("guian-gov-01")["utilisation"] == 0.25
    listed = {dc["id"]: dc for dc in registry_rpc.list_datacenters()}
    assert listed["lingang-com-01"]["utilisation"] is None


def test_keys_and_tokens(registry_rpc):
    assert registry_rpc.datacenter_signing_keys("guian-gov-01") == []
    keys = [registry_rpc.issue_datacenter_key("guian-gov-01") for _ in range(3)]
    active = registry_rpc.datacenter_signing_keys("guian-gov-01")
    assert active == [keys[2], keys[1]]
    with pytest.raises(NotFound) as info:
        registry_rpc.issue_datacenter_key("nowhere")
    assert info.value.code == "datacenter_not_found"
    with pytest.raises(NotFound):
        registry_rpc.get_city("atlantis")

    token = registry_rpc.issue_token("company:91310000MA1FL5XX1G")
    assert registry_rpc.authenticate(token) == {"role": "company:91310000MA1FL5XX1G"}
    assert registry_rpc.authenticate("not-a-token") is None
    with pytest.raises(InvalidRequest) as info:
        registry_rpc.issue_token("superuser")
    assert info.value.code == "invalid_role"
