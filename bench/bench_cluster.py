"""Metering on a three-node RabbitMQ cluster, beside the single system node,
in the same run; and the cluster losing the leader of ``metering.usage``.

    .venv/bin/python bench/bench_cluster.py [--records 20000] [--base-port 5800]

Needs rabbitmq-server installed (deploy/cluster.py starts the cluster under a
tmp directory and removes it), the system RabbitMQ (management on 15672:
the single-node run gets a throw-away vhost) and PostgreSQL (a new database
per run). Each run starts the stand-in registry and one metering process
(``python -m services.metering``, 4 batch consumers) on the broker's URI,
the cluster's being its failover list, then publishes ``--records`` signed
records as a data-centre gateway does (persistent, each confirmed before the
next: tests/support/cluster.py) and times until every record is booked.

Three runs, quorum queues everywhere (QUEUE_TYPE's default):

- ``single``: the system node (quorum queues of one member);
- ``cluster``: the three nodes, no fault;
- ``cluster_kill``: the three nodes, the usage queue's leader killed
  (SIGKILL) a third of the way; every record must still be booked exactly
  once, and the time to do so is the figure.

The last line: ``cluster_records_per_s=<n> single_records_per_s=<n>
ratio=<cluster/single> kill_records_per_s=<n>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from amqp.exceptions import NotFound  # noqa: E402
from benchlib import amqp_uri_of, delete_vhost, make_vhost  # noqa: E402
from kombu import Connection  # noqa: E402

from deploy.cluster import Cluster  # noqa: E402
from tests.support.cluster import publish_confirmed, usage_bodies  # noqa: E402
from tests.support.polling import eventually  # noqa: E402
from tests.support.processes import service_command  # noqa: E402

PG_ADMIN = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
STALL_S = 120


def booked(db_url: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as db:
        return db.execute(
            "SELECT count(*), count(DISTINCT record_id) FROM usage_records"
        ).fetchone()


def consumers(amqp_uri: str) -> int:
    with Connection(amqp_uri) as connection:
        declared = connection.channel().queue_declare("metering.usage", passive=True)
        return declared.consumer_count


def one_run(label: str, amqp_uri: str, bodies, kill=None) -> float:
    """Records/s from the first publish to the last record booked."""
    db_name = f"cn_bench_cluster_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    db_url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{db_name}"
    env = dict(
        os.environ,
        AMQP_URI=amqp_uri,
        DATABASE_URL=db_url,
        LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        # the stand-in registry's RPC queue is nameko's, classic: the node
        # holding it may be the one killed, so its answers are kept
        REGISTRY_CACHE_TTL_S="3600",
    )
    python = sys.executable
    registry = subprocess.Popen(
        [python, "-m", "tests.support.metering_data", amqp_uri], cwd=ROOT, env=env
    )
    metering = subprocess.Popen(service_command("metering"), cwd=ROOT, env=env)
    try:
        eventually(
            lambda: consumers(amqp_uri) >= 1,
            90,
            "metering consuming",
            interval=0.5,
            ignoring=(NotFound,),
        )
        started = time.perf_counter()
        sent = publish_confirmed(amqp_uri, bodies, at=kill)
        print(
            f"{label}: published in {sent['seconds']:.1f} s "
            f"({sent['reconnects']} reconnect(s))",
            flush=True,
        )
        seen, moved = 0, time.monotonic()
        while (count := booked(db_url))[0] < len(bodies):
            if count[0] > seen:
                seen, moved = count[0], time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise RuntimeError(f"{label}: stuck at {count[0]} records")
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        time.sleep(1)  # anything booked twice would show now
        rows, distinct = booked(db_url)
        assert rows == distinct == len(bodies), (rows, distinct)
        assert metering.poll() is None, "metering died"
        rate = len(bodies) / elapsed
        print(f"{label}: {rows} booked once in {elapsed:.1f} s, {rate:.0f}/s")
        return rate
    finally:
        metering.terminate()
        registry.terminate()
        for process in (metering, registry):
            process.wait(30)
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--base-port", type=int, default=5800)
    args = parser.parse_args()
    bodies = usage_bodies(args.records)

    vhost = make_vhost("bench_cluster")
    try:
        single = one_run("single", amqp_uri_of(vhost), bodies)
    finally:
        delete_vhost(vhost)

    directory = tempfile.mkdtemp(prefix="bench-cluster-")
    cluster = Cluster(directory, base_port=args.base_port).start()
    try:
        uri = cluster.failover_uri()
        clustered = one_run("cluster", uri, usage_bodies(args.records))
        # a new database, the same queue: it is empty again
        leader = cluster.leader("metering.usage")
        killed_at: list[float] = []

        def kill(index: int) -> None:
            if index == args.records // 3:
                cluster.kill(leader)
                killed_at.append(time.perf_counter())

        killed = one_run("cluster_kill", uri, usage_bodies(args.records), kill)
        print(f"cluster_kill: {leader} (the usage queue's leader) killed")
        print(f"cluster_kill: new leader {cluster.leader('metering.usage')}")
        started = time.perf_counter()
        cluster.restart(leader)
        rejoined = time.perf_counter() - started
        print(f"{leader} restarted and rejoined in {rejoined:.1f} s")
    finally:
        cluster.stop(remove=True)
    print(
        f"cluster_records_per_s={clustered:.0f} single_records_per_s={single:.0f} "
        f"ratio={clustered / single:.2f} kill_records_per_s={killed:.0f}"
    )


if __name__ == "__main__":
    main()
