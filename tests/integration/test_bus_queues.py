"""The queues every service declares (services/common/amqp.py), on the broker."""

from __future__ import annotations

import nameko
import pytest
from kombu import Connection

from services.common.amqp import (
    DEFAULT_DELIVERY_LIMIT,
    USAGE_EXCHANGE,
    dead_letter_queue,
    durable_queue,
)
from services.common.config import QUEUE_TYPE
from services.metering.service import USAGE_QUEUE
from tests.support import management


def _declare(rabbit_uri, *queues):
    with Connection(rabbit_uri) as connection:
        for queue in queues:
            queue(connection.default_channel).declare()


def test_durable_queues_are_quorum_and_dead_lettered(rabbit_uri):
    """Replicated on a cluster (docs/cluster.md); a backlog waits on disk; the
    broker's delivery limit is far above the 5 attempts the services count."""
    _declare(
        rabbit_uri,
        durable_queue("test.backlog", USAGE_EXCHANGE, ["*.usage"]),
        USAGE_QUEUE,
        dead_letter_queue(),
    )
    vhost = management.vhost_of(rabbit_uri)
    for name in ("test.backlog", "metering.usage"):
        info = management.get("queues", vhost, name)
        assert info["durable"] is True
        assert info["type"] == "quorum"
        assert info["arguments"] == {
            "x-dead-letter-exchange": "computenet.dead",
            "x-queue-type": "quorum",
            "x-delivery-limit": DEFAULT_DELIVERY_LIMIT,
        }
    dead = management.get("queues", vhost, "computenet.dead")
    assert dead["type"] == "quorum"
    assert dead["arguments"] == {"x-queue-type": "quorum"}


@pytest.fixture
def classic_queues():
    nameko.config[QUEUE_TYPE] = "classic"
    yield
    nameko.config.pop(QUEUE_TYPE, None)


def test_classic_queues_stay_lazy(rabbit_uri, classic_queues):
    """QUEUE_TYPE: classic, for a broker whose queues are not migrated yet."""
    _declare(rabbit_uri, durable_queue("test.classic", USAGE_EXCHANGE, ["*.usage"]))
    info = management.get("queues", management.vhost_of(rabbit_uri), "test.classic")
    assert info["type"] == "classic"
    assert info["arguments"] == {
        "x-dead-letter-exchange": "computenet.dead",
        "x-queue-mode": "lazy",
    }
