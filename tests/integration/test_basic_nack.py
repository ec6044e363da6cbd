"""``basic_nack`` on the real broker: a batch's deliveries go back to their
queue, marked redelivered, and the channel stays open (before, the batch
consumer called a method py-amqp does not have and lost its connection)."""

import pytest
from kombu import Connection, Exchange, Queue

from services.common.deliveries import basic_nack

pytestmark = pytest.mark.integration


def test_nack_requeues_every_delivery_up_to_the_tag_and_keeps_the_channel(
    rabbit_uri,
):
    queue = Queue("nack-test", Exchange("nack-test", type="direct"), "k")
    with Connection(rabbit_uri) as connection:
        channel = connection.channel()
        queue(channel).declare()
        producer = connection.Producer(channel)
        for n in range(3):
            producer.publish(str(n), exchange="nack-test", routing_key="k")
        raw = channel  # py-amqp's channel, as the batch consumer holds it
        got = [raw.basic_get("nack-test", no_ack=False) for _ in range(3)]
        assert [m.body for m in got] == ["0", "1", "2"]
        basic_nack(raw, got[-1].delivery_tag, multiple=True, requeue=True)
        again = [raw.basic_get("nack-test", no_ack=False) for _ in range(3)]
        assert [m.body for m in again] == ["0", "1", "2"]
        assert all(m.delivery_info["redelivered"] for m in again)
        raw.basic_ack(again[-1].delivery_tag, multiple=True)
        assert raw.basic_get("nack-test", no_ack=True) is None
        assert raw.is_open
