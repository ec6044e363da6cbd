"""Node loss on a three-node RabbitMQ cluster (issue 16, docs/cluster.md).

metering and a stand-in registry run in containers connected with the
cluster's failover URI; a gateway-like publisher streams ``CLUSTER_RECORDS``
records (2 000 by default) and, a third of the way, the node leading
``metering.usage`` is killed with SIGKILL. Every record must be booked
exactly once, by the same metering, which is never restarted; the node is
then started again and must rejoin, and metering must keep booking.

Skipped, saying why, where rabbitmq-server is not installed, and unless
``CLUSTER_TESTS=1``: in 8 runs on the 2-core machine it failed once and hung
once, undiagnosed (issue 16's closing note), so it is not in ``make test``
until it is stable; ``bench/bench_cluster.py`` runs the full version.
"""

from __future__ import annotations

import contextlib
import os

import nameko
import psycopg
import pytest
from kombu import Connection

from deploy import cluster as local_cluster
from services.common.amqp import city_usage_queue
from services.common.config import AMQP_URI, DATABASE_URL, REGISTRY_CACHE_TTL_S
from services.common.contracts import canonical_json
from services.metering.service import USAGE_QUEUE, MeteringService
from tests.support.cluster import publish_confirmed, usage_bodies
from tests.support.metering_data import StandInRegistry, usage, voucher
from tests.support.polling import eventually
from tests.support.ports import free_block

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("CLUSTER_TESTS") != "1",
        reason="the node-loss test runs with CLUSTER_TESTS=1 (not stable yet)",
    ),
    pytest.mark.skipif(
        local_cluster.available() is not None,
        reason=f"no local RabbitMQ cluster: {local_cluster.available()}",
    ),
]

RECORDS = int(os.environ.get("CLUSTER_RECORDS", "2000"))
GPU_SECONDS = 3600


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory):
    """Three nodes, joined, for this module; stopped and removed after."""
    cluster = local_cluster.Cluster(
        tmp_path_factory.mktemp("cluster"), base_port=free_block(30)
    )
    cluster.start()
    yield cluster
    cluster.stop(remove=True)


@pytest.fixture
def metering_on_cluster(rabbit_cluster, metering_db, container_factory):
    """metering and the stand-in registry, both on the failover URI. The
    registry's answers are cached for the whole test: its RPC queue is a
    classic one (nameko's), which a node's loss may take with it."""
    settings = {
        AMQP_URI: rabbit_cluster.failover_uri(),
        DATABASE_URL: metering_db,
        REGISTRY_CACHE_TTL_S: 3600,
    }
    with nameko.config.patch(settings):
        registry = container_factory(StandInRegistry)
        registry.start()
        metering = container_factory(MeteringService)
        metering.start()
        yield metering


def booked(url: str) -> tuple[int, int, int, int]:
    """(rows, distinct record ids, rolled-up records, rolled-up GPU-seconds)."""
    with psycopg.connect(url) as db:
        rows, distinct = db.execute(
            "SELECT count(*), count(DISTINCT record_id) FROM usage_records"
        ).fetchone()
        records, seconds = db.execute(
            "SELECT coalesce(sum(records), 0), coalesce(sum(gpu_seconds), 0)"
            " FROM usage_rollups_hourly"
        ).fetchone()
    return rows, distinct, int(records), int(seconds)


def exactly(count: int) -> tuple[int, int, int, int]:
    return count, count, count, count * GPU_SECONDS


def test_records_are_booked_exactly_once_through_a_leaders_loss(
    rabbit_cluster, metering_on_cluster, metering_db
):
    leader = eventually(
        lambda: rabbit_cluster.leader(USAGE_QUEUE.name), what="a usage queue leader"
    )
    killed: list[str] = []

    def kill_the_leader(index: int) -> None:
        if index == RECORDS // 3:
            rabbit_cluster.kill(leader)
            killed.append(leader)

    sent = publish_confirmed(
        rabbit_cluster.failover_uri(), usage_bodies(RECORDS, GPU_SECONDS),
        at=kill_the_leader,
    )  # fmt: skip
    assert killed == [leader]
    assert sent["reconnects"] >= 1  # its connection died with the node
    eventually(
        lambda: booked(metering_db) == exactly(RECORDS),
        timeout=180,
        what=lambda: f"{RECORDS} records booked once, not {booked(metering_db)}",
    )
    # A new leader took over, on a node that is still up.
    new_leader = rabbit_cluster.leader(USAGE_QUEUE.name)
    assert new_leader != leader
    assert not metering_on_cluster._died.ready()  # never restarted

    rabbit_cluster.restart(leader)
    assert leader in rabbit_cluster.running_nodes()
    more = 100
    publish_confirmed(rabbit_cluster.failover_uri(), usage_bodies(more, GPU_SECONDS))
    eventually(
        lambda: booked(metering_db) == exactly(RECORDS + more),
        timeout=120,
        what=lambda: f"{RECORDS + more} booked, not {booked(metering_db)}",
    )


def test_usage_rated_reaches_the_city_through_its_queues_leaders_loss(
    rabbit_cluster, metering_on_cluster, metering_db
):
    """The federation side: the leader of ``vouchers_shanghai.usage_rated``
    (declared by the stand-in registry, as the registry does) is killed while
    metering publishes a usage_rated per subsidised record into it; every
    record's event is there afterwards (at least once: metering republishes
    what was not confirmed, with the same event_id), and each is booked once."""
    city_queue = city_usage_queue("shanghai")
    leader = eventually(
        lambda: rabbit_cluster.leader(city_queue.name), what="a city queue leader"
    )
    # what the other test's records left there (the module shares the cluster)
    with Connection(rabbit_cluster.failover_uri()) as connection:
        city_queue(connection.default_channel).purge()
    count = max(RECORDS // 2, 200)
    code = voucher("SH")
    bodies = [
        canonical_json(usage(voucher_code=code, gpu_count=1, gpu_seconds=GPU_SECONDS))
        for _ in range(count)
    ]

    def kill_the_leader(index: int) -> None:
        if index == count // 3:
            rabbit_cluster.kill(leader)

    publish_confirmed(rabbit_cluster.failover_uri(), bodies, at=kill_the_leader)
    eventually(
        lambda: booked(metering_db) == exactly(count),
        timeout=180,
        what=lambda: f"{count} records booked once, not {booked(metering_db)}",
    )
    events: set[str] = set()
    with Connection(
        rabbit_cluster.failover_uri(), failover_strategy="round-robin"
    ) as connection:
        with connection.SimpleQueue(city_queue) as simple:

            def drained() -> bool:
                with contextlib.suppress(simple.Empty):
                    while True:
                        message = simple.get(timeout=0.5)
                        # usage_hold shares the queue (records over the
                        # data centre's registered H800s)
                        key = message.delivery_info["routing_key"]
                        if key == "shanghai.usage_rated":
                            events.add(message.payload["event_id"])
                        message.ack()
                return len(events) >= count

            eventually(
                drained,
                timeout=120,
                what=lambda: f"{count} usage_rated, not {len(events)}",
            )
    assert len(events) == count
    assert rabbit_cluster.leader(city_queue.name) != leader
    rabbit_cluster.restart(leader)
    assert leader in rabbit_cluster.running_nodes()
