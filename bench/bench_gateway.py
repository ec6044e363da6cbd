"""Benchmark of the data-centre gateway: into the outbox, and out of it.

    .venv/bin/python bench/bench_gateway.py [--records 50000] [--database-url URL]

1. accepted: records/s through ``POST /v1/usage`` (real HTTP, batches of 500,
   ``--clients`` concurrent agents) into the outbox, the relay stopped;
2. confirmed: records/s the relay publishes from that outbox to RabbitMQ,
   signed, with publisher confirms, and marks published;
3. baseline: a bare kombu producer with ``confirm_publish`` sending the same
   number of bodies of the same size in the same run.

It works in a throw-away RabbitMQ vhost (management API on :15672) and a
temporary SQLite outbox unless ``--database-url`` names another. The last line
is ``gateway_accepted_records_per_s=… gateway_confirmed_records_per_s=…
baseline_confirmed_per_s=… ratio=…`` (ratio = confirmed ÷ baseline).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import requests
from kombu import Connection, Producer, Queue, binding
from werkzeug.serving import make_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import amqp_uri_of, delete_vhost, make_vhost  # noqa: E402

from services.common.amqp import USAGE_EXCHANGE  # noqa: E402
from services.common.config import DATACENTER_ID, KEY_ID, MAX_BACKLOG  # noqa: E402
from services.common.db import make_engine  # noqa: E402
from services.common.migrations import upgrade  # noqa: E402
from services.common.units import format_ts, utcnow  # noqa: E402
from services.datacenter_gateway.app import create_app  # noqa: E402
from services.datacenter_gateway.domain import InventoryItem  # noqa: E402
from services.datacenter_gateway.outbox import Outbox  # noqa: E402
from services.datacenter_gateway.relay import Relay, RelayStatus  # noqa: E402

DC = "bench-dc"
BATCH = 500


def make_batch(n: int) -> list[dict]:
    ended = utcnow() - timedelta(minutes=1)
    started = format_ts(ended - timedelta(hours=1))
    return [
        {
            "record_id": f"b-{uuid.uuid4().hex}",
            "tenant_id": f"tenant-{i % 50}",
            "gpu_model": "H800",
            "gpu_count": 8,
            "started_at": started,
            "ended_at": format_ts(ended),
            "gpu_seconds": 8 * 3000,
            "source": "simulated",
            "job_id": str(i),
        }
        for i in range(n)
    ]


def bench_accepted(url: str, records: int, clients: int) -> float:
    batches = [make_batch(BATCH) for _ in range(records // BATCH)]
    local = threading.local()

    def post(batch):
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        response = session.post(url + "/v1/usage", json=batch, timeout=60)
        assert response.status_code == 202, response.text[:300]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post, batches))
    return len(batches) * BATCH / (time.perf_counter() - start)


def bench_relay(outbox: Outbox, amqp_uri: str, batch_size: int) -> float:
    total = outbox.backlog(fresh=True)
    status = RelayStatus()
    relay = Relay(outbox, amqp_uri, DC, "bench-k1", "bench-secret", batch_size, status)
    relay._connect()  # connecting is not what is measured
    start = time.perf_counter()
    try:
        while relay.publish_pending():
            pass
    finally:
        relay._disconnect()
    elapsed = time.perf_counter() - start
    assert status.published_total == total, (status.published_total, total)
    return total / elapsed


def bench_baseline(amqp_uri: str, count: int, body: bytes) -> float:
    with Connection(amqp_uri, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.default_channel, exchange=USAGE_EXCHANGE)
        start = time.perf_counter()
        for i in range(count):
            producer.publish(
                body,
                routing_key=f"{DC}.usage",
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=f"base-{i}",
                headers={"x-key-id": "bench-k1", "x-signature": "0" * 64},
                mandatory=True,
            )
        return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--relay-batch", type=int, default=2000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)

    vhost = make_vhost("bench-gateway")
    amqp_uri = amqp_uri_of(vhost)
    tmp = tempfile.TemporaryDirectory()
    url = args.database_url or f"sqlite:///{tmp.name}/outbox.db"
    try:
        with Connection(amqp_uri) as conn:
            queue = Queue(
                "bench.usage",
                bindings=[binding(USAGE_EXCHANGE, routing_key=f"{DC}.usage")],
                durable=True,
            )
            queue(conn.default_channel).declare()
        upgrade("datacenter_gateway", url)
        outbox = Outbox(make_engine(url))
        app = create_app(
            {DATACENTER_ID: DC, KEY_ID: "bench-k1", MAX_BACKLOG: 10**9},
            outbox,
            inventory=[InventoryItem("H800", 4096)],
        )
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base_url = f"http://127.0.0.1:{server.server_port}"

        accepted = bench_accepted(base_url, args.records, args.clients)
        print(f"accepted into the outbox: {accepted:,.0f} records/s", flush=True)
        body = outbox.pending(1)[0].body
        confirmed = bench_relay(outbox, amqp_uri, args.relay_batch)
        print(f"relay published+confirmed: {confirmed:,.0f} records/s", flush=True)
        baseline = bench_baseline(amqp_uri, min(args.records, 20_000), body)
        print(f"bare kombu publisher with confirms: {baseline:,.0f} msgs/s")
        server.shutdown()
        outbox.close()
    finally:
        delete_vhost(vhost)
        tmp.cleanup()
    print(
        f"gateway_accepted_records_per_s={accepted:.0f} "
        f"gateway_confirmed_records_per_s={confirmed:.0f} "
        f"baseline_confirmed_per_s={baseline:.0f} ratio={confirmed / baseline:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
