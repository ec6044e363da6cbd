"""The queues every service declares (services/common/amqp.py), on the broker."""

from __future__ import annotations

from kombu import Connection

from services.common.amqp import USAGE_EXCHANGE, durable_queue
from services.metering.service import USAGE_QUEUE
from tests.support import management


def test_durable_queues_are_lazy_and_dead_lettered(rabbit_uri):
    """A backlog (metering or a city down for hours) waits on disk."""
    with Connection(rabbit_uri) as connection:
        durable_queue("test.backlog", USAGE_EXCHANGE, ["*.usage"])(
            connection.default_channel
        ).declare()
        USAGE_QUEUE(connection.default_channel).declare()
    for name in ("test.backlog", "metering.usage"):
        info = management.get("queues", management.vhost_of(rabbit_uri), name)
        assert info["durable"] is True
        assert info["arguments"] == {
            "x-dead-letter-exchange": "computenet.dead",
            "x-queue-mode": "lazy",
        }
