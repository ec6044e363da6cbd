"""A gateway-like publisher that rides through a broker node's loss (the
node-loss test and bench/bench_cluster.py share it).

It publishes signed usage records as a data-centre gateway does: persistent,
each confirmed by the broker before the next (a quorum queue confirms once a
majority of its members hold the message). A publish that fails because its
node died is retried on the next node of the failover URI; a message whose
confirm was lost with the node may so be sent twice, which is what metering's
exactly-once booking (by record id) is for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kombu import Connection, Exchange

from services.common.amqp import USAGE_EXCHANGE
from services.common.contracts import canonical_json
from tests.support.metering_data import DATACENTER_ID, signed_headers, usage

RETRY_POLICY = {
    "max_retries": 60,
    "interval_start": 0.1,
    "interval_step": 0.2,
    "interval_max": 1.0,
}


def usage_bodies(count: int, gpu_seconds: int = 3600) -> list[bytes]:
    """``count`` records of one data centre, each its own record id."""
    return [
        canonical_json(usage(gpu_seconds=gpu_seconds, gpu_count=1))
        for _ in range(count)
    ]


def publish_confirmed(
    amqp_uri: str,
    bodies: list[bytes],
    at: Callable[[int], None] | None = None,
) -> dict:
    """Publish ``bodies`` on ``<dc>.usage``, confirmed one by one; ``at(i)``
    is called before the ``i``-th (the test kills a node there). Returns
    ``{"seconds", "reconnects"}``."""
    reconnects = 0

    def errback(exc: BaseException, interval: float) -> None:
        nonlocal reconnects
        reconnects += 1

    started = time.perf_counter()
    with Connection(
        amqp_uri,
        transport_options={"confirm_publish": True},
        failover_strategy="round-robin",
        heartbeat=0,
    ) as connection:
        producer = connection.Producer()
        publish = connection.ensure(
            producer, producer.publish, errback=errback, **RETRY_POLICY
        )
        exchange = Exchange(USAGE_EXCHANGE.name, type="topic", durable=True)
        for index, body in enumerate(bodies):
            if at is not None:
                at(index)
            publish(
                body,
                exchange=exchange,
                routing_key=f"{DATACENTER_ID}.usage",
                headers=signed_headers(body),
                delivery_mode=2,
                content_type="application/json",
                user_id=connection.userid or "guest",
            )
    return {"seconds": time.perf_counter() - started, "reconnects": reconnects}
