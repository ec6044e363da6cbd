"""RPC by caller, against the real RabbitMQ (issue 14, item 1).

Each service checks the broker-validated ``user_id`` of every request against
the one table, ``services/common/principals.py: RPC_CALLERS``. The matrix
below is generated from that table: every method of every service, called
by each kind of principal. Members get broker users *without* the registry's
confinement here (a broker misconfigured, or a permission we got wrong), so
that what is tested is the services' own check: the broker's refusal of the
same requests is ``test_broker_permissions.py``'s. ``test_principals.py``
holds the table equal to the services' real ``@rpc`` methods, and those
methods to this entrypoint.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import amqp.exceptions
import pytest
from kombu import Connection, Exchange, Producer
from nameko.standalone.rpc import ClusterRpcClient

from services.city_registry import broker
from services.city_registry.service import CityRegistryService
from services.common.amqp import declare_topology
from services.common.config import DATABASE_URL, DEPLOY_DIR
from services.common.errors import Forbidden
from services.common.migrations import upgrade
from services.common.principals import RPC_CALLERS, uri_as
from services.common.rpc_access import rpc

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RPC = Exchange("nameko-rpc", type="topic", durable=True, passive=True)
OPEN = broker.Permissions(".*", ".*", ".*", {})
# Broker users standing for each kind of member; "mallory" is no member at all.
MEMBERS = ("city.evil", "dc.evil-01", "vendor.evil", "mallory")


def _probe(service_name: str, methods) -> type:
    """A service of that name whose every listed method says it ran."""

    def entry(method: str):
        def run(self, *args, **kwargs):
            return f"ran {method}"

        run.__name__ = method
        return rpc(run)

    return type("Probe", (), {"name": service_name, **{m: entry(m) for m in methods}})


@pytest.fixture
def members(rabbit_uri):
    """Broker users for the members, each with every permission."""
    admin = broker.BrokerAdmin.from_config({"AMQP_URI": rabbit_uri})
    uris = {}
    for user in MEMBERS:
        admin.grant(user, "pw", OPEN)
        uris[user] = uri_as(rabbit_uri, user, "pw")
    yield uris
    for user in MEMBERS:
        admin.delete_user(user)


def _call(uri: str, service: str, method: str, **identity: str):
    with ClusterRpcClient(uri=uri, timeout=10, **identity) as client:
        return getattr(client[service], method)()


@pytest.mark.parametrize(
    "kind, service_name",
    [
        ("city_registry", "city_registry"),
        ("metering", "metering"),
        ("vouchers", "vouchers_probecity"),
    ],
)
def test_every_method_answers_the_national_side_and_refuses_everyone_else(
    kind, service_name, rabbit_config, rabbit_uri, container_factory, members
):
    methods = sorted(RPC_CALLERS[kind])
    container_factory(_probe(service_name, methods), rabbit_config).start()
    wrong = []
    for method in methods:
        # the national side, identified as the user it connects as
        if _call(rabbit_uri, service_name, method, user_id="guest") != f"ran {method}":
            wrong.append(("national", method, "did not run"))
        # the same connection, unidentified: no user_id, no call
        callers = [("unidentified", rabbit_uri, {})]
        callers += [(user, uri, {"user_id": user}) for user, uri in members.items()]
        for who, uri, identity in callers:
            try:
                answer = _call(uri, service_name, method, **identity)
            except Forbidden as exc:
                if exc.code != "rpc_forbidden":
                    wrong.append((who, method, exc.code))
            else:
                wrong.append((who, method, f"answered {answer!r}"))
    assert wrong == []


def test_a_member_cannot_claim_to_be_the_national_side(rabbit_uri, members):
    """RabbitMQ validates user_id: a city publishing as "guest" is refused."""
    with Connection(rabbit_uri) as connection:
        declare_topology(connection)
    with Connection(members["city.evil"]) as connection:
        producer = Producer(connection.channel(), exchange=RPC)
        with pytest.raises(amqp.exceptions.PreconditionFailed):
            producer.publish(
                {"args": ["national_admin"], "kwargs": {}},
                routing_key="city_registry.issue_token",
                user_id="guest",
                reply_to=str(uuid.uuid4()),
            )
            connection.drain_events(timeout=2)


@pytest.fixture
def registry(rabbit_config, pg_url_factory, container_factory):
    url = pg_url_factory("city_registry")
    upgrade("city_registry", url)
    container = container_factory(
        CityRegistryService, {DATABASE_URL: url, DEPLOY_DIR: str(DEPLOY)}
    )
    container.start()
    return container


def test_a_city_asking_the_registry_for_a_national_token_gets_nothing(
    registry, rabbit_uri, members
):
    """The attack of issue 14, on the real registry: a city's user publishes
    ``city_registry.issue_token``. Confined as the registry makes it, the
    broker refuses the publish; unconfined, the registry refuses the call."""
    admin = broker.BrokerAdmin.from_config({"AMQP_URI": rabbit_uri})
    admin.grant("city.wuhan", "pw", broker.city_permissions("wuhan"))
    confined = uri_as(rabbit_uri, "city.wuhan", "pw")
    try:
        with pytest.raises(amqp.exceptions.AccessRefused):
            _call(confined, "city_registry", "list_cities", user_id="city.wuhan")
    finally:
        admin.delete_user("city.wuhan")
    with ClusterRpcClient(
        uri=members["city.evil"], timeout=10, user_id="city.evil"
    ) as client:
        for method, args in (
            ("issue_token", ("national_admin",)),
            ("datacenter_signing_keys", ("guian-gov-01",)),
            ("remove_city", ("shanghai",)),
        ):
            with pytest.raises(Forbidden):
                getattr(client.city_registry, method)(*args)
    # the legitimate path beside it
    with ClusterRpcClient(uri=rabbit_uri, timeout=10, user_id="guest") as client:
        token = client.city_registry.issue_token("national_admin")
        assert client.city_registry.authenticate(token) == {"role": "national_admin"}
        assert client.city_registry.get_city("shanghai")["code"] == "shanghai"
