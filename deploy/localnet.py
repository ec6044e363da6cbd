"""Run the whole computenet network on one machine (``make run``).

Starts, each as its own process as in a deployment: the national registry,
metering, one voucher service per city, one gateway per data centre with a
simulated agent feeding it, and the portal. It provisions what a national
admin would hand out (admin tokens, data-centre signing keys), issues demo
vouchers to the simulated tenants, writes ``var/local-credentials.json``
(CONTRACTS.md §8) and stays in the foreground; Ctrl-C stops everything.

Databases are SQLite files under the var directory unless the environment
says otherwise: ``<NAME>_DATABASE_URL`` for one process (``METERING_DATABASE_URL``,
``VOUCHERS_SHANGHAI_DATABASE_URL`` …) or ``DATABASE_URL_TEMPLATE`` for all
(``postgresql://postgres@127.0.0.1/computenet_{name}``).

The broker is the one at ``AMQP_URI`` (the system RabbitMQ by default);
``BROKER=cluster make run`` starts a local three-node cluster instead and
runs the network on it (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from deploy.demo import (
    DEMO_TENANTS,
    VOUCHERLESS_TENANT,
    authorise_demo_tenants,
    company_tokens,
    issue_demo_vouchers,
)
from deploy.preflight import broker_problem, port_free, postgres_problem
from deploy.processes import Child
from services.common.principals import uri_as

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_AMQP_URI = "amqp://guest:guest@localhost:5672/"
DEFAULT_CITIES = ("shanghai", "chengdu", "shandong")
DEFAULT_DATACENTERS = ("guian-gov-01", "lingang-com-01")
CREDENTIALS_FILE = "local-credentials.json"


class NetworkError(Exception):
    """The network could not start; the message says why in one line."""


def log(message: str) -> None:
    print(f"[localnet] {message}", flush=True)


# --------------------------------------------------------------------------
# The network


@dataclass
class NetworkSpec:
    var_dir: Path = ROOT / "var"
    amqp_uri: str = DEFAULT_AMQP_URI
    cities: tuple[str, ...] = DEFAULT_CITIES
    datacenters: tuple[str, ...] = DEFAULT_DATACENTERS
    portal_port: int = 8000
    gateway_base_port: int = 8101
    simulate: bool = True
    simulate_utilisation: float = 0.3
    heartbeat_interval_s: int = 15
    capacity_interval_s: int = 60
    echo: bool = True
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def database_url(self, name: str) -> str:
        """The database of process ``name``: env override, template, or SQLite."""
        override = self.environ.get(f"{name.upper()}_DATABASE_URL")
        if override:
            return override
        template = self.environ.get("DATABASE_URL_TEMPLATE")
        if template:
            return template.format(name=name)
        return f"sqlite:///{self.var_dir.resolve() / f'{name}.db'}"


class Network:
    def __init__(self, spec: NetworkSpec):
        self.spec = spec
        self.children: list[Child] = []
        self.credentials_path = spec.var_dir / CREDENTIALS_FILE
        self.previous = self._read_previous_credentials()
        self.credentials: dict[str, Any] = {}
        self.demo_vouchers: dict[str, str] = {}  # tenant → voucher code
        self.companies: dict[str, dict[str, Any]] = {}  # credit code → token…
        self._rpc = None

    # -- helpers ------------------------------------------------------------

    @property
    def rpc(self):
        if self._rpc is None:
            from services.common.rpc import RpcPool

            self._rpc = RpcPool(self.spec.amqp_uri, size=2, timeout=10)
        return self._rpc

    def _read_previous_credentials(self) -> dict[str, Any]:
        try:
            return json.loads(self.credentials_path.read_text())
        except (OSError, ValueError):
            return {}

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(self.spec.environ)
        env.update(
            AMQP_URI=self.spec.amqp_uri,
            PYTHONUNBUFFERED="1",
            HEARTBEAT_INTERVAL_S=str(self.spec.heartbeat_interval_s),
            STALE_AFTER_S=str(self.spec.heartbeat_interval_s * 3),
            CAPACITY_INTERVAL_S=str(self.spec.capacity_interval_s),
        )
        env.update(extra)
        return env

    def _spawn(self, name: str, argv: list[str], **env: str) -> Child:
        child = Child(
            name, argv, self._env(**env), self.spec.var_dir / "log", self.spec.echo
        )
        child.start()
        self.children.append(child)
        return child

    def _service(self, name: str, package: str, **env: str) -> Child:
        config = ROOT / "deploy" / "config" / f"{package}.yaml"
        argv = [sys.executable, "-m", f"services.{package}", "--config", str(config)]
        return self._spawn(name, argv, DATABASE_URL=self.spec.database_url(name), **env)

    def _wait(
        self,
        what: str,
        probe: Callable[[], bool],
        child: Child | None,
        timeout: float = 60,
    ):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child is not None and not child.running:
                raise NetworkError(
                    f"{child.name} exited while starting:\n{child.tail()}"
                )
            try:
                if probe():
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            time.sleep(0.3)
        tail = f":\n{child.tail()}" if child else ""
        raise NetworkError(f"{what} did not become ready in {timeout:.0f} s{tail}")

    def _rpc_ready(self, service: str, method: str, child: Child) -> None:
        def answers() -> bool:
            self.rpc.call(service, method)  # raises until the service listens
            return True

        self._wait(service, answers, child)

    # -- start --------------------------------------------------------------

    def start(self) -> None:
        spec = self.spec
        problem = broker_problem(spec.amqp_uri)
        if problem:
            raise NetworkError(problem)
        ports = [spec.portal_port] + [
            spec.gateway_base_port + i for i in range(len(spec.datacenters))
        ]
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise NetworkError(
                f"port(s) {', '.join(map(str, busy))} already in use "
                "(is another `make run` still running?)"
            )
        spec.var_dir.mkdir(parents=True, exist_ok=True)

        # The registry first: its queue must be bound before any city publishes
        # program_published and its first heartbeat.
        registry = self._service(
            "city_registry", "city_registry", DEPLOY_DIR=str(ROOT / "deploy")
        )
        self._rpc_ready("city_registry", "list_cities", registry)
        metering = self._service("metering", "metering")
        # Each city and data centre runs as its own broker user, with exactly
        # its permissions (DESIGN.md §8); the national side (registry,
        # metering, portal, this launcher) as the bootstrap user.
        brokers = {city: self._member_credentials("city", city) for city in spec.cities}
        # Each city runs with the voucher prefix the registry reserved for it
        # when it seeded the city from its rules file (the file's, if free).
        cities = {
            city: self._service(
                f"vouchers_{city}",
                "vouchers",
                AMQP_URI=self._member_uri(brokers[city]),
                CITY_CODE=city,
                RULES_FILE=str(ROOT / "deploy" / "cities" / f"{city}.yaml"),
                VOUCHER_PREFIX=self._reserved_prefix(city),
            )
            for city in spec.cities
        }
        self._rpc_ready("metering", "usage_overview", metering)
        for city, child in cities.items():
            self._rpc_ready(f"vouchers_{city}", "program_states", child)
        log("registry, metering and cities are up")

        tokens = self._provision_tokens()
        datacenters = {}
        for index, dc in enumerate(spec.datacenters):
            key = self._provision_key(dc)
            brokers[dc] = self._member_credentials("datacenter", dc)
            port = spec.gateway_base_port + index
            agent_token = (self.previous.get("datacenters", {}).get(dc) or {}).get(
                "agent_token"
            ) or os.urandom(16).hex()
            child = self._service(
                f"datacenter_gateway_{dc}",
                "datacenter_gateway",
                AMQP_URI=self._member_uri(brokers[dc]),
                DATACENTER_ID=dc,
                KEY_ID=key["key_id"],
                KEY_SECRET=key["secret"],
                HTTP_PORT=str(port),
                AGENT_TOKEN=agent_token,
                DATACENTERS_FILE=str(ROOT / "deploy" / "datacenters.yaml"),
            )
            url = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {agent_token}"}
            self._wait(
                f"gateway {dc}",
                lambda url=url, headers=headers: (
                    requests.get(f"{url}/v1/status", headers=headers, timeout=2).ok
                ),
                child,
            )
            datacenters[dc] = {
                "key_id": key["key_id"],
                "secret": key["secret"],
                "gateway_url": url,
                "agent_token": agent_token,
                "amqp": brokers[dc],
            }
        log("data-centre gateways are up")

        portal_url = f"http://localhost:{spec.portal_port}"
        portal = self._spawn(
            "portal",
            [
                str(Path(sys.executable).parent / "gunicorn"),
                "--bind",
                f"127.0.0.1:{spec.portal_port}",
                "--workers",
                "1",
                "--threads",
                "8",
                "--graceful-timeout",
                "5",
                "gateway.app:create_app()",
            ],
            AUDIT_DATABASE_URL=self.spec.database_url("portal"),
            PORTAL_SECRET_KEY=self._portal_secret(),
        )
        self._wait(
            "portal",
            lambda: requests.get(f"{portal_url}/healthz", timeout=2).ok,
            portal,
        )

        self.credentials = {
            "portal": portal_url,
            "amqp_uri": spec.amqp_uri,
            "national_admin_token": tokens["national_admin"],
            "cities": {
                city: {
                    "admin_token": tokens[f"city_admin:{city}"],
                    "amqp": brokers[city],
                }
                for city in spec.cities
            },
            "datacenters": datacenters,
        }
        if spec.simulate:
            self._issue_demo_vouchers()
            self.credentials["demo_vouchers"] = dict(self.demo_vouchers)
            self.credentials["companies"] = self.companies
            self._start_simulators()
        # Written whole, then renamed: whoever waits for the file never reads
        # half of it, and it is never readable by others.
        partial = self.credentials_path.with_suffix(".partial")
        partial.write_text(json.dumps(self.credentials, indent=2) + "\n")
        os.chmod(partial, 0o600)
        partial.replace(self.credentials_path)

    def _reserved_prefix(self, city: str) -> str:
        """The voucher prefix the registry reserved for ``city``."""
        from services.common.errors import NotFound

        try:
            prefix = self.rpc.call("city_registry", "get_city", city)["voucher_prefix"]
        except NotFound:
            prefix = None
        if not prefix:
            raise NetworkError(
                f"the registry reserved no voucher prefix for {city} "
                f"(is deploy/cities/{city}.yaml there?)"
            )
        return prefix

    def _portal_secret(self) -> str:
        """The dashboard's cookie-signing key, kept across runs in var/."""
        path = self.spec.var_dir / "portal_secret_key"
        if not path.exists():
            path.write_text(os.urandom(32).hex())
            os.chmod(path, 0o600)
        return path.read_text().strip()

    def _provision_tokens(self) -> dict[str, str]:
        """Reuse the tokens of the previous run when the registry still knows them."""
        previous = {
            "national_admin": self.previous.get("national_admin_token"),
            **{
                f"city_admin:{city}": (
                    self.previous.get("cities", {}).get(city) or {}
                ).get("admin_token")
                for city in self.spec.cities
            },
        }
        tokens = {}
        for role, token in previous.items():
            known = token and self.rpc.call("city_registry", "authenticate", token)
            if known and known.get("role") == role:
                tokens[role] = token
            else:
                tokens[role] = self.rpc.call("city_registry", "issue_token", role)
        return tokens

    def _member_credentials(self, kind: str, member: str) -> dict[str, str]:
        """A fresh password for the member's own broker user (its permissions
        set by the registry): ``{"username", "password"}``."""
        return self.rpc.call("city_registry", "grant_member_credentials", kind, member)

    def _member_uri(self, credentials: dict[str, str]) -> str:
        return uri_as(
            self.spec.amqp_uri, credentials["username"], credentials["password"]
        )

    def _provision_key(self, dc: str) -> dict[str, str]:
        old = (self.previous.get("datacenters", {}) or {}).get(dc) or {}
        if old.get("key_id"):
            active = self.rpc.call("city_registry", "datacenter_signing_keys", dc)
            if any(
                k["key_id"] == old["key_id"] and k["secret"] == old.get("secret")
                for k in active
            ):
                return {"key_id": old["key_id"], "secret": old["secret"]}
        return self.rpc.call("city_registry", "issue_datacenter_key", dc)

    def _issue_demo_vouchers(self) -> None:
        """The demo companies' vouchers, and each company's portal token."""
        vouchers = issue_demo_vouchers(
            self.rpc, self.spec.cities, self.previous.get("demo_vouchers") or {}, log
        )
        self.demo_vouchers = {tenant: v["code"] for tenant, v in vouchers.items()}
        authorise_demo_tenants(self.rpc, vouchers, self.spec.datacenters, log)
        self.companies = company_tokens(
            self.rpc, vouchers, self.previous.get("companies") or {}
        )

    def _start_simulators(self) -> None:
        for dc in self.spec.datacenters:
            creds = self.credentials["datacenters"][dc]
            argv = [
                sys.executable,
                "-m",
                "services.datacenter_gateway.simulate",
                "--gateway-url",
                creds["gateway_url"],
                "--token",
                creds["agent_token"],
                # Small, frequent jobs keeping about 30 % of each centre busy
                # (DESIGN.md §1: many run at 20-30 %), so the national view
                # moves every few seconds and the demo vouchers last for days.
                "--utilisation",
                str(self.spec.simulate_utilisation),
                "--max-gpus",
                "8",
                "--max-duration",
                "3600",
                "--tenant-without-voucher",
                VOUCHERLESS_TENANT,
                # One short job per tenant first: subsidies show within
                # seconds, even at night when the rate is lowest.
                "--warm-start",
            ]
            for tenant in DEMO_TENANTS.get(dc, []):
                if tenant in self.demo_vouchers:
                    argv += ["--tenant", f"{tenant}={self.demo_vouchers[tenant]}"]
            self._spawn(f"agent_{dc}", argv)

    # -- run and stop -------------------------------------------------------

    def watch(self, stop: threading.Event) -> int:
        """Block until ``stop`` is set or a process dies; returns an exit code."""
        while not stop.wait(0.5):
            for child in self.children:
                if not child.running:
                    log(
                        f"{child.name} exited with code "
                        f"{child.proc.returncode}; stopping"
                    )
                    return 1
        return 0

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self._rpc is not None:
            self._rpc.close()


# --------------------------------------------------------------------------
# Command line


def _start_cluster(var_dir: Path, environ: dict[str, str]):
    """``BROKER=cluster``: a local three-node RabbitMQ cluster under
    ``<var>/cluster`` (deploy/cluster.py; ``CLUSTER_BASE_PORT``, default
    5700), stopped with the network. Every process gets the failover URI of
    the three nodes; the registry manages broker users through the first
    node's management API (users and vhosts are the whole cluster's)."""
    from deploy.cluster import Cluster, ClusterError

    cluster = Cluster(
        var_dir / "cluster", base_port=int(environ.get("CLUSTER_BASE_PORT", 5700))
    )
    log(f"starting a three-node RabbitMQ cluster in {cluster.directory}")
    try:
        cluster.start()
    except ClusterError as exc:
        raise NetworkError(f"the local cluster did not start: {exc}") from exc
    environ["BROKER_ADMIN_URL"] = cluster.management_url()
    log(f"cluster up: {', '.join(node.name for node in cluster.nodes)}")
    return cluster


def _run(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    cluster = None
    if environ.get("BROKER", "single") == "cluster":
        try:
            cluster = _start_cluster(Path(args.var_dir).resolve(), environ)
        except NetworkError as exc:
            print(f"computenet: {exc}", file=sys.stderr)
            return 1
        args.amqp_uri = cluster.failover_uri()
    spec = NetworkSpec(
        var_dir=Path(args.var_dir).resolve(),
        amqp_uri=args.amqp_uri,
        environ=environ,
        cities=tuple(args.cities.split(",")),
        portal_port=args.portal_port,
        gateway_base_port=args.gateway_port,
        simulate=not args.no_simulate,
        heartbeat_interval_s=args.heartbeat_interval,
        echo=not args.quiet,
    )
    network = Network(spec)
    stop = threading.Event()

    # Set from another thread: the handler runs in the main thread, which may
    # be inside stop.wait() holding the event's lock (setting it here could
    # deadlock, as it once did in a data-centre gateway).
    def request_stop(*_: object) -> None:
        threading.Thread(target=stop.set, daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    try:
        network.start()
        log(f"the network is up: portal {network.credentials['portal']}")
        log(f"credentials: {network.credentials_path}")
        log("Ctrl-C stops everything")
        code = network.watch(stop)
    except NetworkError as exc:
        print(f"computenet: {exc}", file=sys.stderr)
        code = 1
    finally:
        if network.children:
            log("stopping")
            network.stop()
            log("stopped")
        if cluster is not None:
            log("stopping the cluster")
            cluster.stop()
    return code


def _preflight(args: argparse.Namespace) -> int:
    problems = [broker_problem(args.amqp_uri)]
    if args.postgres:
        problems.append(postgres_problem(args.postgres))
    problems = [p for p in problems if p]
    for problem in problems:
        print(f"computenet: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.localnet")
    parser.add_argument(
        "--amqp-uri", default=os.environ.get("AMQP_URI", DEFAULT_AMQP_URI)
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the whole network in the foreground")
    run.add_argument("--var-dir", default=str(ROOT / "var"))
    run.add_argument("--cities", default=",".join(DEFAULT_CITIES))
    run.add_argument("--portal-port", type=int, default=8000)
    run.add_argument(
        "--gateway-port", type=int, default=8101, help="first gateway's port"
    )
    run.add_argument("--no-simulate", action="store_true", help="no simulated agents")
    run.add_argument("--heartbeat-interval", type=int, default=15)
    run.add_argument("--quiet", action="store_true", help="logs to files only")
    pre = sub.add_parser(
        "preflight", help="check that RabbitMQ (and PostgreSQL) answer"
    )
    pre.add_argument("--postgres", default=None, help="also check this PostgreSQL URL")
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    return _preflight(args)


if __name__ == "__main__":
    sys.exit(main())
