"""Measure one city's voucher service on PostgreSQL: redemptions/s and issues/s.

Starts the real service process (``python -m services.vouchers``) against a
fresh PostgreSQL database, then

- issues: N applications over RPC from C concurrent callers;
- redemptions: publishes M ``usage_rated`` messages (one voucher, the worst
  case for row locks) on the federation exchange and times until every one
  is booked **and** its ``voucher_redeemed`` event is on the bus (the real
  consumer path: AMQP → batch → schema → one ledger transaction per batch →
  confirmed publish of the batch's events, overlapping the next batch's
  transaction → ack), then checks the books: exactly M redemptions, the
  voucher's redeemed total to the fen, and ``check_ledger`` clean.

Ends with ``redemptions_per_s=<n> issues_per_s=<n>`` (CONTRACTS.md §9).

    .venv/bin/python bench/bench_vouchers.py [--records 5000] [--issues 400]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from kombu import Connection, Queue, binding
from nameko.standalone.rpc import ClusterRpcClient
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import amqp_uri_of, delete_vhost, make_vhost  # noqa: E402

from services.common import creditcode  # noqa: E402
from services.common.amqp import FEDERATION_EXCHANGE, federation_key  # noqa: E402
from services.common.db import make_engine  # noqa: E402
from services.common.rpc_access import caller_options  # noqa: E402
from services.vouchers.batching import UsageRatedConsumer  # noqa: E402
from services.vouchers.ledger import check_ledger  # noqa: E402
from tests.support.polling import eventually  # noqa: E402
from tests.support.vouchers_books import consent_by_rpc  # noqa: E402
from tests.support.vouchers_data import publish_usage_rated, rated  # noqa: E402

CITY = "benchcity"
RULES = f"""\
city: {CITY}
name: Bench City
region: east
voucher_prefix: BC
programs:
  - id: bc-compute
    kind: compute
    budget_cny: 100000000000
    rate_percent: 80
    max_rate_percent: 90
    face_value_cny: {{min: 1000, max: 2000000}}
    valid_days: 365
    bonuses:
      - when: {{government_run: true}}
        add_percent: 10
"""
ADMIN = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Set in main(): a throw-away vhost, so that the bench's events never reach the
# queues of a local network (`make run`) on the default vhost.
AMQP = ""


DC = {"government_run": False, "hub_region": "east", "chip_origin": "imported"}
REDEEMED_QUEUE = "bench.vouchers.voucher_redeemed"


def application(n: int, face: int = 1000) -> dict:
    return {
        "program_id": "bc-compute",
        "company": {
            "registration_id": creditcode.generate(),
            "name": "Bench Co",
            "registered_in": CITY,
            "employees": 10,
        },
        "requested_face_value_cny": face,
    }


def booked(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM redemptions").fetchone()[0]


def queued(channel, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).message_count


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--issues", type=int, default=400)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument(
        "--consumers",
        type=int,
        default=UsageRatedConsumer.default_consumers,
        help="CONSUMERS",
    )
    parser.add_argument(
        "--batch", type=int, default=UsageRatedConsumer.default_batch_size
    )
    args = parser.parse_args()

    global AMQP
    vhost = make_vhost("bench_vouchers")
    AMQP = amqp_uri_of(vhost)
    name = f"cn_bench_vouchers_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    folder = Path(tempfile.mkdtemp())
    rules = folder / f"{CITY}.yaml"
    rules.write_text(RULES)
    config = folder / "vouchers.yaml"
    config.write_text(
        (ROOT / "deploy" / "config" / "vouchers.yaml").read_text()
        + f"CONSUMERS: {args.consumers}\nBATCH_SIZE: {args.batch}\n"
    )
    env = dict(
        os.environ,
        CITY_CODE=CITY,
        RULES_FILE=str(rules),
        DATABASE_URL=url,
        AMQP_URI=AMQP,
        LOG_LEVEL="WARNING",
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.vouchers",
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        with Connection(AMQP) as connection:  # a clean queue from earlier runs
            channel = connection.channel()
            try:
                channel.queue_purge(f"vouchers_{CITY}.usage_rated")
            except Exception:  # noqa: BLE001 - not declared yet
                pass
        with ClusterRpcClient(uri=AMQP, timeout=30, **caller_options(AMQP)) as rpc:
            city = getattr(rpc, f"vouchers_{CITY}")
            eventually(
                lambda: city.program_states() is not None,
                60,
                "the city to start",
                interval=0.2,
                ignoring=(Exception,),  # starting
            )
            code = city.apply(application(0, 2_000_000))["voucher"]["code"]
            # Its holder authorises the bench's tenant, a day back so that
            # the records (of the last hour) started after it (DESIGN.md §9).
            consent_by_rpc(city, url, code, tenants=(("dc-bench", "t"),))

        # -- issues/s: concurrent RPC callers
        def issue_batch(ns):
            with ClusterRpcClient(uri=AMQP, timeout=30, **caller_options(AMQP)) as rpc:
                service = getattr(rpc, f"vouchers_{CITY}")
                for n in ns:
                    assert service.apply(application(n))["voucher"]
            return len(ns)

        batches = [range(i, args.issues, args.callers) for i in range(args.callers)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.callers) as pool:
            done = sum(pool.map(issue_batch, batches))
        issue_s = time.perf_counter() - started
        issues_per_s = done / issue_s
        print(f"issues: {done} in {issue_s:.2f} s over {args.callers} callers")

        # -- redemptions/s: the consumer path
        bodies = [
            rated(
                code,
                f"bench-{i}",
                1000,
                DC,
                city=CITY,
                event_id=f"bench-{i}",
                datacenter_id="dc-bench",
                tenant_id="t",
            )
            for i in range(args.records)
        ]
        with Connection(AMQP) as connection:
            channel = connection.channel()
            # Counts the city's voucher_redeemed events: the end of the path.
            Queue(
                REDEEMED_QUEUE,
                bindings=[
                    binding(
                        FEDERATION_EXCHANGE,
                        routing_key=federation_key(CITY, "voucher_redeemed"),
                    )
                ],
                auto_delete=False,
            )(channel).declare()
            channel.queue_purge(REDEEMED_QUEUE)
            started = time.perf_counter()
            publish_usage_rated(connection, *bodies, city=CITY)
            published_s = time.perf_counter() - started
            deadline = time.monotonic() + 120
            booked_s = None
            while queued(channel, REDEEMED_QUEUE) < args.records:
                if time.monotonic() > deadline:
                    raise SystemExit("timed out waiting for voucher_redeemed events")
                if booked_s is None and booked(url) >= args.records:
                    booked_s = time.perf_counter() - started
                time.sleep(0.02)
            redeem_s = time.perf_counter() - started
            booked_s = booked_s or redeem_s
            events = queued(channel, REDEEMED_QUEUE)
            channel.queue_delete(REDEEMED_QUEUE)
        redemptions_per_s = args.records / redeem_s
        print(
            f"redemptions: {args.records} booked in {booked_s:.2f} s, their events "
            f"all on the bus in {redeem_s:.2f} s (publishing the usage took "
            f"{published_s:.2f} s; "
            f"batches of up to {args.batch}, {args.consumers} consumer(s))"
        )

        # The books: every record once, to the fen.
        rows = booked(url)
        with psycopg.connect(url) as conn:
            redeemed = conn.execute(
                "SELECT redeemed_fen FROM vouchers WHERE code = %s", (code,)
            ).fetchone()[0]
        engine = make_engine(url)
        with Session(engine) as session:
            problems = check_ledger(session)
        engine.dispose()
        print(
            f"check: {rows} redemptions, {events} events, voucher redeemed "
            f"{redeemed} fen (expected {args.records * 800}), ledger "
            f"{'balances' if not problems else problems[:3]}"
        )
        if rows != args.records or redeemed != args.records * 800 or problems:
            raise SystemExit("the books are wrong")
    finally:
        process.terminate()
        process.wait(20)
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        delete_vhost(vhost)
    print(f"redemptions_per_s={redemptions_per_s:.0f} issues_per_s={issues_per_s:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
