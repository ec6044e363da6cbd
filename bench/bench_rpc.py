"""One RPC round trip as the portal makes it (services/common/rpc.py), beside
nameko's standalone client with its defaults.

    .venv/bin/python bench/bench_rpc.py [--calls 500]

A trivial nameko service runs in this process on a throw-away vhost; a
standalone client (as ``RpcPool`` makes them) calls it ``--calls`` times one
after another, twice in the same run:

1. baseline: ``nameko.standalone.rpc.ClusterRpcClient`` as it comes: request
   and reply persistent (each confirmed publish to a durable queue waits for
   RabbitMQ's disk) and a new broker connection for every reply awaited;
2. computenet: ``services.common.rpc.Client``: transient request and reply,
   one reply connection kept for the life of the client.

Ends with ``rpc_p50_ms=… rpc_p99_ms=… baseline_rpc_p50_ms=…
baseline_rpc_p99_ms=…``.
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import nameko  # noqa: E402
import nameko.rpc  # noqa: E402
from nameko.amqp.publish import Publisher  # noqa: E402
from nameko.containers import ServiceContainer  # noqa: E402
from nameko.rpc import rpc  # noqa: E402
from nameko.standalone.rpc import ClusterRpcClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import throwaway_vhost  # noqa: E402

from services.common.rpc import Client, TransientPublisher  # noqa: E402
from services.common.rpc_access import caller_options  # noqa: E402


class Echo:
    name = "bench_echo"

    @rpc
    def echo(self, value):
        return value


def round_trips(standalone: ClusterRpcClient, calls: int) -> list[float]:
    times = []
    with standalone as client:
        client.bench_echo.echo(0)  # connect, declare
        for i in range(calls):
            began = time.perf_counter()
            client.bench_echo.echo(i)
            times.append((time.perf_counter() - began) * 1000)
    return sorted(times)


def pct(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(len(values) * q))], 2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    figures = {}
    with (
        throwaway_vhost("bench_rpc") as amqp_uri,
        nameko.config.patch({"AMQP_URI": amqp_uri}),
    ):
        container = ServiceContainer(Echo)
        container.start()
        try:
            for name, publisher, client in (
                (
                    "baseline",
                    Publisher,
                    ClusterRpcClient(
                        uri=amqp_uri, timeout=10, **caller_options(amqp_uri)
                    ),
                ),
                ("computenet", TransientPublisher, Client(amqp_uri, timeout=10)),
            ):
                nameko.rpc.Responder.publisher_cls = publisher
                figures[name] = times = round_trips(client, args.calls)
                print(
                    f"{name}: {args.calls} calls p50={pct(times, 0.5)} ms "
                    f"p99={pct(times, 0.99)} ms",
                    flush=True,
                )
        finally:
            container.stop()
    new, old = figures["computenet"], figures["baseline"]
    print(
        f"rpc_p50_ms={pct(new, 0.5)} rpc_p99_ms={pct(new, 0.99)} "
        f"baseline_rpc_p50_ms={pct(old, 0.5)} baseline_rpc_p99_ms={pct(old, 0.99)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
