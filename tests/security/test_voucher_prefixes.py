"""Prefix squatting (issue 14, item 4), over the real RabbitMQ and PostgreSQL.

The prefix of a voucher code names its city, and metering routes
``usage_rated`` by the registry's prefix map: a city that could make the
registry list it under another city's prefix would receive that city's
usage. Prefixes are reserved at admission; a city publishing, under its own
broker user, a ``program_published`` or a voucher claiming another's is
refused, while the rightful city's publications are applied.

Admission and registration are driven through the real portal app over a
real RPC client, with exactly CONTRACTS.md §7's fields and with the optional
``voucher_prefix``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from nameko.standalone.rpc import ServiceRpcClient

from gateway.app import create_app
from gateway.audit import AUDIT, AUDIT_DATABASE_URL
from services.city_registry.broker import BrokerAdmin
from services.city_registry.service import FEDERATION_QUEUE, CityRegistryService
from services.common.amqp import federation_key
from services.common.config import DATABASE_URL, DEPLOY_DIR, STALE_AFTER_S
from services.common.contracts import make_event
from services.common.migrations import upgrade
from services.common.principals import uri_as
from services.common.rpc import RpcPool
from services.common.rpc_access import caller_options
from services.common.vouchercode import PREFIX, generate
from tests.support.bus import wait_acked
from tests.support.federation_data import program, publish_events, voucher_issued
from tests.support.polling import eventually
from tests.support.portal_data import datacenter

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture
def registry_rpc(rabbit_config, pg_url_factory, container_factory):
    url = pg_url_factory("city_registry")
    upgrade("city_registry", url)
    container_factory(
        CityRegistryService,
        {DATABASE_URL: url, DEPLOY_DIR: str(DEPLOY), STALE_AFTER_S: 60},
    ).start()
    with ServiceRpcClient("city_registry", timeout=10, **caller_options()) as client:
        yield client


@pytest.fixture
def broker_users(rabbit_uri):
    """Names of broker users the test made (users are not per vhost):
    deleted after it."""
    made: list[str] = []
    yield made
    admin = BrokerAdmin.from_config({"AMQP_URI": rabbit_uri})
    for user in made:
        admin.delete_user(user)


def _code(stem: str) -> str:
    return f"{stem}_{uuid.uuid4().hex[:6]}"


def _published(city: str, eid: str, budget: int, **extra) -> tuple[str, dict]:
    body = make_event(
        "program_published", city, eid, programs=[program(city, budget)], **extra
    )
    return federation_key(city, "program_published"), body


def test_a_city_cannot_publish_another_citys_prefix(
    registry_rpc, rabbit_uri, broker_users
):
    code = _code("squat")
    admitted = registry_rpc.admit_city(code, "Squatter", voucher_prefix="QSQ")
    broker_users.append(admitted["amqp"]["username"])
    assert admitted["city"]["voucher_prefix"] == "QSQ"
    squatter = uri_as(rabbit_uri, **admitted["amqp"])  # its own broker user

    # The attack: Shanghai's prefix announced as its own, and a voucher of it.
    attack = [
        _published(code, "p-attack", 5_000, voucher_prefix="SH"),
        voucher_issued(code, "i-attack", generate("SH"), 1_000),
    ]
    # Its legitimate path: its own prefix, its own voucher.
    own = [
        _published(code, "p-own", 7_000, voucher_prefix="QSQ"),
        voucher_issued(code, "i-own", generate("QSQ"), 300),
    ]
    publish_events(squatter, attack + own)
    # Shanghai's own publications keep working (its code: the local guest).
    shanghai = [
        _published("shanghai", "p-sh", 9_000, voucher_prefix="SH"),
        voucher_issued("shanghai", "i-sh", generate("SH"), 2_000),
    ]
    publish_events(rabbit_uri, shanghai)
    wait_acked(rabbit_uri, FEDERATION_QUEUE, len(attack + own + shanghai))

    prefixes = registry_rpc.voucher_prefixes()
    assert prefixes["SH"] == "shanghai" and prefixes["QSQ"] == code
    assert list(prefixes.values()).count(code) == 1
    # The city's page is cached for VIEW_CACHE_S (the admission answer too).
    city = eventually(
        lambda: (c := registry_rpc.get_city(code))["budget_fen"] and c,
        10,
        "the city's page with its program",
    )
    # Only its own: the claiming program_published and voucher were refused.
    assert city["voucher_prefix"] == "QSQ"
    assert (city["budget_fen"], city["committed_fen"]) == (7_000, 300)
    assert city["vouchers_issued"] == 1
    sh = registry_rpc.get_city("shanghai")
    assert (sh["budget_fen"], sh["committed_fen"]) == (9_000, 2_000)
    assert sh["voucher_prefix"] == "SH"


@pytest.fixture
def portal(rabbit_uri, registry_rpc, tmp_path):
    """The real portal app over a real RPC client, and a national token."""
    pool = RpcPool(rabbit_uri, size=2, timeout=10)
    app = create_app(
        {
            "AMQP_URI": rabbit_uri,
            "rpc": pool,
            AUDIT_DATABASE_URL: f"sqlite:///{tmp_path / 'portal.db'}",
        }
    )
    token = registry_rpc.issue_token("national_admin")
    yield app.test_client(), {"Authorization": f"Bearer {token}"}
    app.extensions[AUDIT].dispose()
    pool.close()


def test_admission_with_the_contract_fields_alone_reserves_a_prefix(
    portal, broker_users
):
    client, national = portal
    code = _code("ningbo")
    response = client.post(
        "/api/v1/cities", json={"code": code, "name": "Ningbo"}, headers=national
    )
    assert response.status_code == 201, response.json
    broker_users.append(response.json["amqp"]["username"])
    prefix = response.json["city"]["voucher_prefix"]
    assert PREFIX.match(prefix)
    assert client.get(f"/api/v1/cities/{code}").json["voucher_prefix"] == prefix


def test_admission_reserves_the_requested_prefix_or_another(portal, broker_users):
    client, national = portal
    first, second = _code("wuxi"), _code("wuhu")
    wanted = {"code": first, "name": "Wuxi", "voucher_prefix": "QWX"}
    response = client.post("/api/v1/cities", json=wanted, headers=national)
    assert response.status_code == 201, response.json
    broker_users.append(response.json["amqp"]["username"])
    assert response.json["city"]["voucher_prefix"] == "QWX"
    assert client.get(f"/api/v1/cities/{first}").json["voucher_prefix"] == "QWX"

    taken = {"code": second, "name": "Wuhu", "voucher_prefix": "QWX"}
    response = client.post("/api/v1/cities", json=taken, headers=national)
    assert response.status_code == 201, response.json
    broker_users.append(response.json["amqp"]["username"])
    assert response.json["city"]["voucher_prefix"] not in ("QWX", None)

    bad = {"code": _code("x"), "name": "X", "voucher_prefix": "qw1"}
    refused = client.post("/api/v1/cities", json=bad, headers=national)
    assert refused.status_code == 400 and "voucher_prefix" in refused.json["details"]


def test_a_datacenter_registers_with_exactly_the_contract_fields(portal, broker_users):
    client, national = portal
    dc_id = f"dc-{uuid.uuid4().hex[:6]}"
    body = datacenter(id=dc_id, name="West", operator="op", utilisation=None)
    response = client.post("/api/v1/datacenters", json=body, headers=national)
    assert response.status_code == 201, response.json
    broker_users.append(response.json["amqp"]["username"])
    shown = client.get(f"/api/v1/datacenters/{dc_id}").json
    assert shown["city"] is None and shown["hub_region"] == "west"
    assert shown["inventory"] == body["inventory"]
