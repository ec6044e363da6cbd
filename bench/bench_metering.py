"""Metering throughput: 100 000 signed usage records published to
``computenet.usage`` → verified, rated, committed → ``usage_rated`` published,
beside a bare kombu publish-and-consume of the same messages (confirms, acks).

    .venv/bin/python bench/bench_metering.py [--records 100000] [--runs 3]

Needs RabbitMQ (management API on 15672) and PostgreSQL; makes its own vhost
and database for each run and removes them. metering runs as a real process
(``python -m services.metering``; ``--processes`` of them competing on the
queue, default 2) with a stand-in ``city_registry`` process.

A run is the baseline, then metering, on the same messages. On this shared
2-core machine one run's figures swing by ±20 % from one minute to the next,
so ``--runs`` (default 3) runs are made and the last line gives the medians
(``ratio`` is the median of each run's own ratio):
``metering_records_per_s=<n> baseline_records_per_s=<n> ratio=<r>``.
Each phase also prints the CPU seconds that RabbitMQ, PostgreSQL, the bench's
publisher (and baseline consumer) and metering spent, read from ``/proc``,
and per record: where the time goes, whatever the machine's other load.

The choices, on the 2-core machine the figures come from:

- 2 processes: metering's Python is one core at most per process, and
  RabbitMQ (about half of all CPU in the run), PostgreSQL and the publisher
  need the rest; one process did worse, more would only contend.
- ``--consumers`` 4 batch consumers per process (``CONSUMERS``, the deployed
  default): a batch spends most of its time waiting (the database's
  commit, the broker's confirms), so four keep each process busy where two
  left it waiting. Batches of 500 (``BATCH_SIZE``, metering.yaml's default).
- The baseline is the bare path of the same messages: the same publisher
  (py-amqp's ``basic_publish`` one by one, as kombu does, at most
  ``WINDOW`` unconfirmed), one consumer with manual acks (every 100,
  prefetch 400) in its own process, persistent messages, and a queue like
  metering's own (durable, lazy, dead-lettered, bound to ``computenet.usage``
  by ``*.usage``, published with the same routing key). metering's
  ``usage_rated`` events go to a queue declared as a city's voucher service
  declares its own.
  Each message carries ``message_id=<record_id>`` (CONTRACTS.md §1; before,
  the key id was sent there by mistake, in both runs alike).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import amqp
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import CpuMeter, delete_vhost, make_vhost  # noqa: E402

from services.common.amqp import (  # noqa: E402
    USAGE_EXCHANGE,
    city_usage_queue,
    durable_queue,
)
from services.common.contracts import canonical_json  # noqa: E402
from services.common.units import format_ts, utcnow  # noqa: E402
from tests.support.metering_data import signed_headers, usage, voucher  # noqa: E402
from tests.support.polling import eventually  # noqa: E402
from tests.support.processes import service_command  # noqa: E402

PG_ADMIN = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
WINDOW = 2000  # messages published and not yet confirmed, at most
ROUTING_KEY = "guian-gov-01.usage"  # DATACENTER_ID of tests/support/metering_data.py
STALL_S = 60  # metering published nothing for this long: it is stuck


# An honest data centre's stream (the holds' checks on, none held): in time
# order, RECORDS_PER_HOUR two-GPU hours starting in each hour, so each hour's
# GPU-seconds (at most 120 × 7 200) fit its 256 H800s (921 600): every batch
# takes the capacity check's hot path (its buckets' upsert, nothing read),
# and nothing is held (a usage_hold would count as a usage_rated below).
RECORDS_PER_HOUR = 120


def messages(count: int) -> list[tuple[bytes, dict, str]]:
    codes = [voucher("SH") for _ in range(20)] + [voucher("CD") for _ in range(20)]
    end = utcnow().replace(microsecond=0) - timedelta(minutes=1)
    hours = count // RECORDS_PER_HOUR + 1
    out = []
    for n in range(count):
        started = end - timedelta(hours=hours - n // RECORDS_PER_HOUR)
        record = usage(
            record_id=f"bench-{n}",
            tenant_id=f"tenant-{n % 50}",
            voucher_code=codes[n % len(codes)],
            gpu_seconds=3600 + n % 3600,
            started_at=format_ts(started),
            ended_at=format_ts(started + timedelta(hours=1)),
        )
        body = canonical_json(record)
        out.append((body, signed_headers(body), record["record_id"]))
    return out


def publish(connection, channel, bodies, exchange: str, routing_key: str) -> None:
    """Publish one by one, as kombu does (py-amqp's ``basic_publish``), with
    confirms: at most ``WINDOW`` outstanding. Both runs publish alike."""
    confirmed = [0]  # every delivery tag up to this one is confirmed
    singles: set[int] = set()  # confirmed one by one, beyond it

    def ack(tag, multiple):
        if multiple:
            confirmed[0] = max(confirmed[0], tag)
        else:
            singles.add(tag)
        while confirmed[0] + 1 in singles:
            confirmed[0] += 1
            singles.discard(confirmed[0])

    def nack(tag, multiple):
        raise RuntimeError(f"the broker refused message {tag}")

    channel.events["basic_ack"].add(ack)
    channel.events["basic_nack"].add(nack)
    written = 0
    for body, headers, record_id in bodies:
        channel.basic_publish(
            amqp.Message(
                body,
                content_type="application/json",
                delivery_mode=2,
                application_headers=headers,
                message_id=record_id,
                # validated by the broker, checked by metering (its cost is
                # in the figures: as a gateway publishes)
                user_id=BROKER_USER,
            ),
            exchange,
            routing_key,
        )
        written += 1
        if written - confirmed[0] >= WINDOW:
            while written - confirmed[0] > WINDOW // 2:
                connection.drain_events(timeout=30)
    while confirmed[0] < written:
        connection.drain_events(timeout=30)


# The bench publishes as the local bootstrap user, which metering takes as the
# national side (principals.py); a gateway publishes as dc.<id>: the check
# costs the same.
BROKER_USER = "guest"


CITIES = ("shanghai", "chengdu")  # the records' vouchers: SH- and CD-


def rated_depth(channel) -> int:
    return sum(queue_depth(channel, f"vouchers_{city}.usage_rated") for city in CITIES)


def connect(vhost: str) -> amqp.Connection:
    connection = amqp.Connection(
        "localhost:5672", userid=BROKER_USER, password="guest", virtual_host=vhost
    )
    connection.connect()
    return connection


def baseline_consumer(vhost: str, queue: str, count: int, ready, done, release) -> None:
    connection = connect(vhost)
    channel = connection.channel()
    channel.basic_qos(0, 400, False)
    seen = [0]

    def on_message(message):
        seen[0] += 1
        if seen[0] % 100 == 0 or seen[0] == count:
            channel.basic_ack(message.delivery_tag, multiple=True)

    channel.basic_consume(queue, callback=on_message)
    ready.set()
    while seen[0] < count:
        connection.drain_events(timeout=60)
    done.set()
    release.wait(30)  # alive until its CPU time is read
    connection.close()


def run_baseline(vhost: str, bodies) -> tuple[float, CpuMeter]:
    connection = connect(vhost)
    channel = connection.channel()
    # the queue metering consumes, under another name: same exchange, key,
    # arguments (durable, lazy, dead-lettered)
    declare(channel, durable_queue("bench.baseline", USAGE_EXCHANGE, ["*.usage"]))
    channel.confirm_select()
    ready, done, release = (multiprocessing.Event() for _ in range(3))
    consumer = multiprocessing.Process(
        target=baseline_consumer,
        args=(vhost, "bench.baseline", len(bodies), ready, done, release),
    )
    consumer.start()
    ready.wait(30)
    meter = CpuMeter(bench=[os.getpid()], consumer=[consumer.pid]).start()
    started = time.perf_counter()
    publish(connection, channel, bodies, USAGE_EXCHANGE.name, ROUTING_KEY)
    done.wait(600)
    elapsed = time.perf_counter() - started
    meter.stop()
    release.set()
    consumer.join(30)
    channel.queue_delete("bench.baseline")  # metering's run publishes there next
    connection.close()
    return len(bodies) / elapsed, meter


def declare(channel, queue) -> None:
    """A kombu ``Queue`` of services/common/amqp.py, on a py-amqp channel."""
    channel.queue_declare(
        queue.name, durable=True, auto_delete=False, arguments=queue.queue_arguments
    )
    for bound in queue.bindings:
        exchange = bound.exchange
        channel.exchange_declare(
            exchange.name, exchange.type, durable=True, auto_delete=False
        )
        channel.queue_bind(queue.name, exchange.name, bound.routing_key)


def queue_depth(channel, name: str) -> int:
    return channel.queue_declare(name, passive=True).message_count


def run_metering(
    vhost: str, db_url: str, bodies, env_extra: dict, processes: int
) -> tuple[float, CpuMeter]:
    amqp_uri = f"amqp://guest:guest@localhost:5672/{vhost}"
    env = dict(
        os.environ,
        AMQP_URI=amqp_uri,
        DATABASE_URL=db_url,
        LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        **env_extra,
    )
    python = sys.executable
    registry = subprocess.Popen(
        [python, "-m", "tests.support.metering_data", amqp_uri], cwd=ROOT, env=env
    )
    # e.g. BENCH_PROFILE=var/metering.py-spy to record where metering's time goes
    profile = os.environ.get("BENCH_PROFILE")
    wrapper = (
        [
            str(Path(python).parent / "py-spy"),
            "record",
            "--format",
            "raw",
            "--rate",
            "200",
            "-o",
            profile,
            "--",
        ]
        if profile
        else []
    )
    # Competing consumers on metering.usage (DESIGN.md): ``processes`` of
    # them. The first one migrates the new database; the others start once it
    # consumes (two migrating one empty database at once would collide).
    command = service_command("metering")
    meterings = [subprocess.Popen([*wrapper, *command], cwd=ROOT, env=env)]
    per_process = int(env.get("CONSUMERS", 4))
    try:
        connection = connect(vhost)
        channel = connection.channel()
        # the cities' own queues, as their voucher services and the registry
        # declare them (metering's usage_rated are mandatory: one queue each)
        for city in CITIES:
            declare(channel, city_usage_queue(city))

        def wait_consumers(count: int) -> None:
            def consuming() -> bool:  # metering has declared its queue and consumes
                if any(m.poll() is not None for m in meterings):
                    raise RuntimeError("metering did not start")
                probe = connection.channel()
                declared = probe.queue_declare("metering.usage", passive=True)
                return declared.consumer_count >= count

            eventually(
                consuming,
                60,
                f"{count} consumers on metering.usage",
                interval=0.2,
                ignoring=(amqp.exceptions.NotFound,),
            )

        wait_consumers(per_process)
        meterings += [
            subprocess.Popen(command, cwd=ROOT, env=env) for _ in range(processes - 1)
        ]
        wait_consumers(per_process * processes)
        channel.confirm_select()
        meter = CpuMeter(
            bench=[os.getpid()], metering=[m.pid for m in meterings]
        ).start()
        started = time.perf_counter()
        publish(connection, channel, bodies, "computenet.usage", "guian-gov-01.usage")
        print(f"published in {time.perf_counter() - started:.1f} s", flush=True)
        probe = connection.channel()
        last = time.monotonic()
        seen, moved = 0, time.monotonic()
        while (depth := rated_depth(probe)) < len(bodies):
            now = time.monotonic()
            if depth > seen:
                seen, moved = depth, now
            elif now - moved > STALL_S:
                raise RuntimeError(f"no usage_rated for {STALL_S} s, {depth} in all")
            if now - last > 5:
                print(f"... {depth} usage_rated so far", flush=True)
                last = now
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        meter.stop()
        with psycopg.connect(db_url) as db:
            stored = db.execute("SELECT count(*) FROM usage_records").fetchone()[0]
            rolled = db.execute(
                "SELECT sum(records) FROM usage_rollups_hourly"
            ).fetchone()[0]
        assert stored == len(bodies) == rolled, (stored, rolled)
        assert all(m.poll() is None for m in meterings), "a metering process died"
        connection.close()
        return len(bodies) / elapsed, meter
    finally:
        # py-spy writes its profile on SIGINT, and passes it on to metering
        for n, metering in enumerate(meterings):
            profiled = profile and n == 0
            metering.send_signal(signal.SIGINT if profiled else signal.SIGTERM)
        registry.terminate()
        for process in (*meterings, registry):
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="baseline-then-metering pairs; the medians are reported"
        " (default: %(default)s)",
    )
    parser.add_argument("--batch-size", default=None)
    parser.add_argument(
        "--consumers",
        default="4",
        help="batch consumers per metering process (default: %(default)s)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="metering processes competing on the queue (default: %(default)s)",
    )
    args = parser.parse_args()
    env_extra = {}
    if args.batch_size:
        env_extra["BATCH_SIZE"] = args.batch_size
    if args.consumers:
        env_extra["CONSUMERS"] = args.consumers
    bodies = messages(args.records)
    runs = []
    for run in range(1, args.runs + 1):
        print(f"== run {run} of {args.runs}; load before: {os.getloadavg()}")
        runs.append(one_run(bodies, env_extra, args.processes))
    metering = statistics.median(m for m, _ in runs)
    baseline = statistics.median(b for _, b in runs)
    ratio = statistics.median(m / b for m, b in runs)
    if args.runs > 1:
        print(
            "runs (metering / baseline records/s): "
            + ", ".join(f"{m:.0f} / {b:.0f}" for m, b in runs)
            + "; the medians:"
        )
    print(
        f"metering_records_per_s={metering:.0f} "
        f"baseline_records_per_s={baseline:.0f} ratio={ratio:.2f}"
    )


def one_run(bodies, env_extra: dict, processes: int) -> tuple[float, float]:
    """The baseline, then metering, each on a new vhost and database."""
    vhost = make_vhost("bench_metering")
    db_name = f"cn_bench_metering_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    db_url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{db_name}"
    try:
        baseline, meter = run_baseline(vhost, bodies)
        print(f"baseline: {baseline:.0f} records/s", flush=True)
        print(f"baseline {meter.line(len(bodies))}", flush=True)
        metering, meter = run_metering(vhost, db_url, bodies, env_extra, processes)
        print(
            f"metering ({processes} competing process(es)): {metering:.0f} records/s",
            flush=True,
        )
        print(f"metering {meter.line(len(bodies))}", flush=True)
        print(f"load after: {os.getloadavg()}", flush=True)
    finally:
        delete_vhost(vhost)
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    return metering, baseline


if __name__ == "__main__":
    main()
