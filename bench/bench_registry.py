"""The national view at scale: p50/p99 of the portal's summary and city pages.

Writes synthetic state straight into fresh PostgreSQL databases — the
registry's read model of 300 cities (two programs each, with money) and 1 000
data centres, and metering's hourly rollups and capacity reports of 10⁷ usage
records over the last 7 days (as ~168 000 rollup rows, not 10⁷ rows) — then
starts ``city_registry`` and ``metering`` as processes on a fresh RabbitMQ
vhost and the portal under gunicorn, and times ``GET /api/v1/network/summary``
and ``GET /api/v1/cities/<city>`` under 20 concurrent clients.

The portal serves both from its PublicView (gateway/publicview.py): one
snapshot of the registry's ``public_view``, rendered, replaced behind the
readers once a second; the registry computes it at most every 2 s
(``VIEW_CACHE_S``). What is measured is a national view at most ~3 s old.
The baseline, measured in the same run against a second portal with
``PUBLIC_CACHE_TTL_S=0``, asks the registry on every request.

The 20 clients are keep-alive connections on one asyncio loop that does
nothing else; threads with ``requests`` measured mostly their own turns at
the GIL.

    .venv/bin/python bench/bench_registry.py [--requests 2000]

Ends with ``summary_p50_ms=<n> summary_p99_ms=<n> city_p99_ms=<n>
baseline_summary_p99_ms=<n> baseline_city_p99_ms=<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import throwaway_vhost  # noqa: E402

from services.common.migrations import upgrade  # noqa: E402
from services.metering.models import UsageRollup  # noqa: E402
from tests.support.polling import eventually  # noqa: E402

ADMIN_PG = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CITIES, DATACENTERS, RECORDS, DAYS = 300, 1_000, 10_000_000, 7
CLIENTS = 20


def _copy(conn, table: str, columns: list[str], rows) -> None:
    with conn.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


def seed_registry(url: str, now: datetime, rng: random.Random) -> list[str]:
    codes = [f"city{i:03d}" for i in range(CITIES)]
    with psycopg.connect(url) as conn:
        city_rows, program_rows = [], []
        for code in codes:
            money = [0, 0, 0, 0]
            for p in range(2):
                budget = rng.randint(10, 600) * 10**8
                committed = budget // rng.randint(3, 10)
                redeemed, released = committed // 3, committed // 10
                issued = rng.randint(10, 300)
                program_rows.append(
                    (
                        code,
                        f"{code}-p{p}",
                        "compute",
                        budget,
                        8000,
                        "v1",
                        "a" * 64,
                        committed,
                        redeemed,
                        released,
                        issued,
                        issued // 10,
                    )
                )
                for i, v in enumerate((committed, redeemed, released, issued)):
                    money[i] += v
            city_rows.append(
                (code, code.title(), "east", None, now, *money, money[3] // 10, now)
            )
        _copy(
            conn,
            "cities",
            [
                "code",
                "name",
                "region",
                "voucher_prefix",
                "last_heartbeat_at",
                "committed_fen",
                "redeemed_fen",
                "released_fen",
                "vouchers_issued",
                "vouchers_closed",
                "created_at",
            ],
            city_rows,
        )
        _copy(
            conn,
            "programs",
            [
                "city_code",
                "id",
                "kind",
                "budget_fen",
                "rate_bp",
                "rules_version",
                "rules_sha256",
                "committed_fen",
                "redeemed_fen",
                "released_fen",
                "vouchers_issued",
                "vouchers_closed",
            ],
            program_rows,
        )
        regions = ["east", "west", "central", "north", "south"]
        _copy(
            conn,
            "datacenters",
            [
                "id",
                "name",
                "operator",
                "city",
                "hub_region",
                "government_run",
                "inventory",
                "created_at",
            ],
            (
                (
                    f"dc-{i:04d}",
                    f"Data centre {i}",
                    "bench",
                    rng.choice(codes),
                    rng.choice(regions),
                    i % 3 == 0,
                    json.dumps(
                        [
                            {
                                "gpu_model": "H800",
                                "count": 64 * (1 + i % 8),
                                "chip_origin": "imported",
                                "price_fen_per_gpu_hour": 1500 + i % 900,
                            }
                        ]
                    ),
                    now,
                )
                for i in range(DATACENTERS)
            ),
        )
    return codes


def seed_metering(url: str, codes: list[str], now: datetime) -> int:
    """Hourly rollups of RECORDS records and one capacity report per hour."""
    hours = DAYS * 24
    top = now.replace(minute=0, second=0, microsecond=0)
    per_row, extra = divmod(RECORDS, DATACENTERS * hours)
    rows = written = 0
    with psycopg.connect(url) as conn:

        def rollups():
            nonlocal rows, written
            for i in range(DATACENTERS):
                dc, city, gpus = f"dc-{i:04d}", codes[i % len(codes)], 64 * (1 + i % 8)
                for h in range(hours):
                    records = per_row + (1 if rows < extra else 0)
                    rows += 1
                    written += records
                    gpu_seconds = records * 3600 * 4
                    yield (
                        dc,
                        city,
                        f"tenant-{i % 50}",
                        "",
                        "H800",
                        top - timedelta(hours=h),
                        records,
                        min(gpu_seconds, gpus * 3600),
                        gpu_seconds * 5 // 10,
                    )

        # every column but the id, in the model's order (as rollups() yields)
        columns = [c.name for c in UsageRollup.__table__.c if c.name != "id"]
        _copy(conn, UsageRollup.__tablename__, columns, rollups())
        # the all-time totals metering keeps beside the rollups
        conn.execute(
            "INSERT INTO usage_totals (datacenter_id, stripe, records,"
            " gpu_seconds, cost_fen) SELECT datacenter_id, 0, sum(records),"
            " sum(gpu_seconds), sum(cost_fen) FROM usage_rollups_hourly"
            " GROUP BY datacenter_id"
        )

        def reports():
            for i in range(DATACENTERS):
                gpus = 64 * (1 + i % 8)
                for h in range(hours):
                    at = top - timedelta(hours=h)
                    yield (
                        f"dc-{i:04d}",
                        at,
                        at,
                        uuid.uuid4().hex * 2,
                        gpus,
                        gpus // 4,
                        json.dumps(
                            [{"model": "H800", "total": gpus, "allocated": gpus // 4}]
                        ),
                    )

        _copy(
            conn,
            "capacity_reports",
            [
                "datacenter_id",
                "reported_at",
                "received_at",
                "report_sha256",
                "total_gpus",
                "allocated_gpus",
                "gpus",
            ],
            reports(),
        )
        conn.execute("ANALYZE")
    return written


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(what, probe, timeout=90):
    try:
        eventually(probe, timeout, what, interval=0.3, ignoring=(Exception,))
    except AssertionError as exc:  # not up yet, all along
        raise SystemExit(f"bench: {what} did not start in {timeout} s") from exc


async def _client(index: int, host: str, port: int, paths, n: int, times) -> None:
    """One dashboard: a keep-alive HTTP/1.1 connection, a GET at a time."""
    reader, writer = await asyncio.open_connection(host, port)
    rng = random.Random(index)
    try:
        for _ in range(n):
            request = f"GET {rng.choice(paths)} HTTP/1.1\r\nHost: {host}\r\n\r\n"
            began = time.perf_counter()
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            times.append((time.perf_counter() - began) * 1000)
            status = head.split(b" ", 2)[1]
            if status != b"200":
                raise SystemExit(f"bench: {request.split()[1]} answered {status}")
    finally:
        writer.close()


def load(portal: str, paths: list[str], total: int) -> list[float]:
    """``total`` GETs from CLIENTS concurrent connections, sorted latencies.

    The clients share one event loop that does nothing else: a thread per
    client (``requests``) measured mostly its own wait for the GIL, 20
    threads taking 5 ms turns, not the portal."""
    host, port = portal.removeprefix("http://").split(":")
    times: list[float] = []

    async def run() -> None:
        await asyncio.gather(
            *(
                _client(i, host, int(port), paths, total // CLIENTS, times)
                for i in range(CLIENTS)
            )
        )

    asyncio.run(run())
    return sorted(times)


def pct(values: list[float], q: float) -> int:
    return round(values[min(len(values) - 1, int(len(values) * q))])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000, help="per endpoint")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    args = parser.parse_args()
    # Stopped with SIGTERM, still drop the processes, vhost and databases.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with throwaway_vhost("bench_registry") as amqp_uri:
        return run(args, amqp_uri)


def run(args: argparse.Namespace, amqp_uri: str) -> int:
    tag = uuid.uuid4().hex[:8]
    base = ADMIN_PG.rsplit("/", 1)[0]
    dbs = {name: f"cn_bench_{tag}_{name}" for name in ("city_registry", "metering")}
    with psycopg.connect(ADMIN_PG, autocommit=True) as conn:
        for db in dbs.values():
            conn.execute(f'CREATE DATABASE "{db}"')
    urls = {name: f"{base}/{db}" for name, db in dbs.items()}
    procs: list[subprocess.Popen] = []
    empty_deploy = ROOT / "var" / f"bench-deploy-{tag}"
    try:
        now = datetime.now(UTC)
        rng = random.Random(6)
        began = time.perf_counter()
        for name, url in urls.items():
            upgrade(name, url)
        codes = seed_registry(urls["city_registry"], now, rng)
        written = seed_metering(urls["metering"], codes, now)
        print(
            f"seeded {CITIES} cities, {DATACENTERS} data centres, {written} records "
            f"as hourly rollups in {time.perf_counter() - began:.1f} s",
            flush=True,
        )
        empty_deploy.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            AMQP_URI=amqp_uri,
            PYTHONUNBUFFERED="1",
            DEPLOY_DIR=str(empty_deploy),
            LOG_LEVEL="WARNING",
        )
        for name in ("city_registry", "metering"):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        f"services.{name}",
                        "--config",
                        str(ROOT / "deploy" / "config" / f"{name}.yaml"),
                    ],
                    cwd=ROOT,
                    env=dict(env, DATABASE_URL=urls[name]),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        def portal(public_cache_ttl_s: str) -> str:
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "gunicorn"),
                        "-b",
                        f"127.0.0.1:{port}",
                        "-w",
                        str(args.workers),
                        "--threads",
                        "10",
                        "gateway.app:create_app()",
                    ],
                    cwd=ROOT,
                    env=dict(
                        env, RPC_POOL_SIZE="10", PUBLIC_CACHE_TTL_S=public_cache_ttl_s
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                body = requests.get(f"{url}/api/v1/network/summary", timeout=30)
                return body.ok and body.json()["gpu_seconds"] is not None

            wait("the portal and registry", ready, timeout=120)
            return url

        # The portal as deployed (public view in memory, 1 s) and, as the
        # baseline, the same portal asking the registry on every request.
        served, asking = portal("1"), portal("0")
        summary_path, city_paths = (
            "/api/v1/network/summary",
            [f"/api/v1/cities/{c}" for c in codes],
        )
        figures = {}
        for name, url in (("baseline", asking), ("portal", served)):
            load(url, [summary_path], CLIENTS * 5)  # warm up
            summary = load(url, [summary_path], args.requests)
            city = load(url, city_paths, args.requests)
            figures[name] = (summary, city)
            print(
                f"{name}: summary n={len(summary)} p50={pct(summary, 0.5)} ms "
                f"p99={pct(summary, 0.99)} ms; city n={len(city)} "
                f"p50={pct(city, 0.5)} ms p99={pct(city, 0.99)} ms "
                f"({CLIENTS} clients, gunicorn -w {args.workers} --threads 10)",
                flush=True,
            )
        summary, city = figures["portal"]
        base_summary, base_city = figures["baseline"]
        print(
            f"summary_p50_ms={pct(summary, 0.5)} summary_p99_ms={pct(summary, 0.99)} "
            f"city_p99_ms={pct(city, 0.99)} "
            f"baseline_summary_p99_ms={pct(base_summary, 0.99)} "
            f"baseline_city_p99_ms={pct(base_city, 0.99)}"
        )
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        with psycopg.connect(ADMIN_PG, autocommit=True) as conn:
            for db in dbs.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        if empty_deploy.exists():
            empty_deploy.rmdir()


if __name__ == "__main__":
    sys.exit(main())
