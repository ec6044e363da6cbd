"""The registry's federation consumer never loops on an event (issue 16):
against a real RabbitMQ vhost and a real PostgreSQL database, an event the
database refuses (a budget of 2⁶³ fen) is tried ``MAX_ATTEMPTS`` times, then
parked with its reason; a body that is not JSON is parked at once; the events
behind both are applied; an operator lists and replays them."""

import json
from pathlib import Path

import pytest
from kombu import Connection
from nameko import config
from nameko.standalone.rpc import ServiceRpcClient

from services.city_registry.parking import MAX_ATTEMPTS
from services.city_registry.service import CityRegistryService
from services.common.amqp import FEDERATION_EXCHANGE, federation_key
from services.common.config import DATABASE_URL, DEPLOY_DIR, STALE_AFTER_S
from services.common.contracts import make_event
from services.common.migrations import upgrade
from services.common.rpc_access import caller_options
from tests.support.federation_data import program, publish_events
from tests.support.polling import eventually

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


def published(city, eid, budget_fen):
    return (
        federation_key(city, "program_published"),
        make_event(
            "program_published", city, eid, programs=[program(city, budget_fen)]
        ),
    )


def test_a_poison_event_is_parked_and_the_queue_goes_on(registry_rpc):
    poison = published("shanghai", "sh-poison", 2**63)  # no BIGINT holds it
    with Connection(config["AMQP_URI"]) as connection:
        connection.Producer().publish(
            b"{not json",
            exchange=FEDERATION_EXCHANGE,
            routing_key=federation_key("chengdu", "heartbeat"),
            content_type="application/json",
            delivery_mode=2,
        )
    publish_events(config["AMQP_URI"], [poison, published("chengdu", "cd-p", 5_000)])

    def chengdu_published():
        chengdu = registry_rpc.get_city("chengdu")
        return chengdu if chengdu["programs"] else None

    chengdu = eventually(chengdu_published, timeout=30)
    assert chengdu["programs"][0]["budget_fen"] == 5_000  # behind both: applied

    def both_parked():
        found = registry_rpc.list_parked_events()
        return found if found["total"] == 2 else None

    parked = {item["kind"]: item for item in eventually(both_parked, 30)["items"]}
    failed, rejected = parked["failed"], parked["rejected"]
    assert failed["event_id"] == "sh-poison"
    assert failed["attempts"] == MAX_ATTEMPTS
    assert "DataError" in failed["reason"] or "out of range" in failed["reason"]
    assert rejected["attempts"] == 1 and "not JSON" in rejected["reason"]
    assert registry_rpc.get_city("shanghai")["programs"] == []
    only_failed = registry_rpc.list_parked_events(kind="failed")
    assert [item["id"] for item in only_failed["items"]] == [failed["id"]]

    # Replayed, it still fails: it stays listed, with what the replay came to.
    again = registry_rpc.replay_parked_event(failed["id"])
    assert again["outcome"] == "parked_again" and again["reason"]
    listed = registry_rpc.list_parked_events(kind="failed")["items"][0]
    assert listed["outcome"] == "parked_again" and listed["replayed_at"]


def test_an_event_naming_another_city_is_parked_as_rejected(registry_rpc):
    # Another city's name: rejected; a replay cannot make it valid. (An event
    # parked as failed and applied once its cause is gone: the unit test's.)
    body = json.dumps(
        make_event("heartbeat", "shanghai", "sh-h1", version="1", uptime_s=1)
    ).encode()
    with Connection(config["AMQP_URI"]) as connection:
        connection.Producer().publish(
            body,
            exchange=FEDERATION_EXCHANGE,
            routing_key=federation_key("chengdu", "heartbeat"),  # another city
            content_type="application/json",
            delivery_mode=2,
        )

    def parked():
        found = registry_rpc.list_parked_events(kind="rejected")
        return found["items"] or None

    (item,) = eventually(parked, 30)
    assert "names city 'shanghai'" in item["reason"]
    assert registry_rpc.replay_parked_event(item["id"])["outcome"] == "parked_again"
