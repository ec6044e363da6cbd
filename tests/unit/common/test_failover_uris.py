"""An ``AMQP_URI`` naming a cluster's nodes (``amqp://…;amqp://…``): what
reads a URI's parts reads each one, or the first (docs/cluster.md)."""

from __future__ import annotations

import nameko
import pytest
from kombu import Connection

from services.city_registry.broker import management_target
from services.common.amqp import (
    DEFAULT_DELIVERY_LIMIT,
    dead_letter_queue,
    queue_type_arguments,
)
from services.common.config import QUEUE_TYPE, broker_urls, primary_url
from services.common.principals import uri_as, username_of
from services.metering.service import USAGE_QUEUE

CLUSTER = (
    "amqp://national.x:pw@localhost:5700/cn;"
    "amqp://national.x:pw@localhost:5701/cn; amqp://national.x:pw@localhost:5702/cn"
)


def test_the_brokers_of_a_failover_uri():
    assert broker_urls(CLUSTER) == [
        f"amqp://national.x:pw@localhost:{port}/cn" for port in (5700, 5701, 5702)
    ]
    assert primary_url(CLUSTER) == "amqp://national.x:pw@localhost:5700/cn"
    assert broker_urls("amqp://h/") == ["amqp://h/"]


def test_kombu_takes_the_other_nodes_as_alternates():
    connection = Connection(CLUSTER)
    assert connection.port == 5700
    assert len(connection.alt) == 3


def test_the_user_and_a_members_uri_on_every_node():
    assert username_of(CLUSTER) == "national.x"
    member = uri_as(CLUSTER, "city.shanghai", "s;cret")
    assert broker_urls(member) == [
        f"amqp://city.shanghai:s%3Bcret@localhost:{port}/cn"
        for port in (5700, 5701, 5702)
    ]


def test_the_management_target_is_the_first_nodes():
    assert management_target(CLUSTER, None) == (
        "http://localhost:15672",
        ("national.x", "pw"),
        "cn",
    )
    url, _, vhost = management_target(CLUSTER, "http://localhost:5710")
    assert (url, vhost) == ("http://localhost:5710", "cn")


def test_queues_are_quorum_unless_configured_classic():
    assert queue_type_arguments({}) == {
        "x-queue-type": "quorum",
        "x-delivery-limit": DEFAULT_DELIVERY_LIMIT,
    }
    assert queue_type_arguments({QUEUE_TYPE: "classic"}) == {"x-queue-mode": "lazy"}
    with pytest.raises(ValueError):
        queue_type_arguments({QUEUE_TYPE: "stream"})


def test_a_queues_type_is_read_as_it_is_declared():
    """The queues are module constants, built before the config is loaded."""
    with nameko.config.patch({QUEUE_TYPE: "classic"}):
        assert USAGE_QUEUE.queue_arguments["x-queue-mode"] == "lazy"
        assert "x-queue-type" not in USAGE_QUEUE.queue_arguments
    assert USAGE_QUEUE.queue_arguments["x-queue-type"] == "quorum"
    assert USAGE_QUEUE.queue_arguments["x-dead-letter-exchange"] == "computenet.dead"
    dead = dead_letter_queue()
    assert dead.queue_arguments == {"x-queue-type": "quorum"}
