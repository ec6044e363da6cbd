"""A local three-node RabbitMQ cluster on one machine (docs/cluster.md).

DESIGN.md §3 lets the bus be a RabbitMQ cluster with quorum queues; this
launcher makes one on a laptop or a CI runner, beside the system broker
(``rabbit@<host>`` on 5672/15672, which it never touches), so that node loss
can be tested and measured (tests/integration/test_cluster_node_loss.py,
bench/bench_cluster.py) and ``BROKER=cluster make run`` can run on it.

Each node is a ``rabbitmq-server`` of its own: its node name (``cn1@localhost``
…), ports, data and log directories under one directory, and its own
configuration files, so that the system's ``/etc/rabbitmq`` (which names the
system node and its listener) is not read. Ports from ``--base-port P``, for
node ``i`` = 0, 1, 2: AMQP ``P+i``, management ``P+10+i``, Erlang
distribution ``P+20+i``.

The nodes share an Erlang cookie of their own, in ``<dir>/.erlang.cookie``,
not the system node's (``/var/lib/rabbitmq/.erlang.cookie``, the one
``/usr/sbin/rabbitmqctl`` uses as root, since it runs the CLI as the
``rabbitmq`` user): a cluster command that names the wrong node cannot then
reach, or join, the system broker. This module runs the CLI with
``HOME=<dir>``, where that cookie is.

    python -m deploy.cluster start  --dir /tmp/cn-cluster --base-port 5700
    python -m deploy.cluster status --dir /tmp/cn-cluster --base-port 5700
    python -m deploy.cluster stop   --dir /tmp/cn-cluster --base-port 5700

From Python (pytest fixtures, benches): :class:`Cluster` — ``start()``,
``uris()``/``failover_uri()``, ``kill(node)`` (``kill -9`` of its Erlang VM),
``restart(node)`` (and wait until it has rejoined), ``leader(queue)``,
``stop()``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests

RABBITMQ_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
DEFAULT_BASE_PORT = 5700
DEFAULT_SIZE = 3
HOST = "localhost"
START_TIMEOUT_S = 90.0


class ClusterError(Exception):
    """The cluster (or one node) could not be started, joined or reached."""


def available() -> str | None:
    """Why a local cluster cannot be started here, or None if it can."""
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if not (RABBITMQ_BIN / tool).exists():
            return (
                f"{RABBITMQ_BIN / tool} is not installed (apt install rabbitmq-server)"  # noqa: E501
            )
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class Node:
    """One node of the cluster: its name, ports and directory."""

    index: int
    name: str  # cn1@localhost
    amqp_port: int
    management_port: int
    dist_port: int
    directory: Path

    @property
    def pid_file(self) -> Path:
        return self.directory / "beam.pid"

    def pid(self) -> int | None:
        """The OS pid of the node's Erlang VM, as the node wrote it."""
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie (killed, not yet reaped) is not alive.
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if state[0] == "Z":
                return False
        return True


class Cluster:
    """A local RabbitMQ cluster of ``size`` nodes under ``directory``.

    Everything is derived from ``directory``, ``base_port`` and ``size``, so
    that a second process (``python -m deploy.cluster stop``) finds the nodes
    the first one started.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        base_port: int = DEFAULT_BASE_PORT,
        size: int = DEFAULT_SIZE,
        prefix: str = "cn",
        management: bool = True,
    ) -> None:
        if directory is None:
            directory = Path(tempfile.gettempdir()) / f"computenet-cluster-{base_port}"
        self.directory = Path(directory).resolve()
        self.base_port = base_port
        self.management = management
        self.nodes = [
            Node(
                index=i,
                name=f"{prefix}{i + 1}@{HOST}",
                amqp_port=base_port + i,
                management_port=base_port + 10 + i,
                dist_port=base_port + 20 + i,
                directory=self.directory / f"{prefix}{i + 1}",
            )
            for i in range(size)
        ]
        self._procs: dict[str, subprocess.Popen] = {}

    # -- addressing -----------------------------------------------------------

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if name in (node.name, node.name.split("@")[0]):
                return node
        raise KeyError(name)

    def uris(
        self, user: str = "guest", password: str = "guest", vhost: str = "/"
    ) -> list[str]:
        """One ``amqp://`` URI per node, in node order."""
        path = quote(vhost, safe="")
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return [f"amqp://{auth}@{HOST}:{n.amqp_port}/{path}" for n in self.nodes]

    def failover_uri(self, **kwargs: str) -> str:
        """Every node's URI joined by ``;``: kombu's failover form, which
        ``AMQP_URI`` accepts (services/common/config.py ``broker_urls``)."""
        return ";".join(self.uris(**kwargs))

    def management_url(self, node: str | None = None) -> str:
        target = self.node(node) if node else self.nodes[0]
        return f"http://{HOST}:{target.management_port}"

    # -- the command line tools ----------------------------------------------

    def _env(self, node: Node | None = None) -> dict[str, str]:
        """The environment of a node's server, or of the CLI (``node=None``).

        ``HOME`` holds the cluster's cookie; ``RABBITMQ_CONF_ENV_FILE`` points
        at an empty file so the system's rabbitmq-env.conf (which sets
        ``NODENAME=rabbit@…``) is not read.
        """
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("RABBITMQ_") and key != "ERL_FLAGS"
        }
        env["HOME"] = str(self.directory)
        env["RABBITMQ_CONF_ENV_FILE"] = str(self.directory / "rabbitmq-env.conf")
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_CONFIG_FILE=str(node.directory / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(node.directory / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(node.directory / "enabled_plugins"),
                RABBITMQ_MNESIA_BASE=str(node.directory / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.directory / "log"),
                RABBITMQ_PID_FILE=str(node.pid_file),
                # Bind distribution to loopback, as the system node does.
                ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
            )
        return env

    def ctl(
        self, node: str | Node, *args: str, timeout: float = 60.0, check: bool = True
    ) -> str:
        """``rabbitmqctl -n <node> args…`` with the cluster's cookie; its stdout."""
        target = node if isinstance(node, Node) else self.node(node)
        argv = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", target.name, "-q", *args]
        done = subprocess.run(
            argv,
            env=self._env(),
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise ClusterError(
                f"rabbitmqctl -n {target.name} {' '.join(args)}: "
                f"{(done.stderr or done.stdout).strip()[:400]}"
            )
        return done.stdout

    # -- files ------------------------------------------------------------------

    def _prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        cookie = self.directory / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
            cookie.chmod(0o400)
        (self.directory / "rabbitmq-env.conf").touch()
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            lines = [
                f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
                # Three nodes: the side with fewer of them pauses, so that a
                # node cut off from the others cannot accept what they won't see.
                "cluster_partition_handling = pause_minority",
                "log.file.level = info",
                "log.console = false",
            ]
            if self.management:
                lines += [
                    f"management.tcp.port = {node.management_port}",
                    "management.tcp.ip = 127.0.0.1",
                ]
            (node.directory / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
            plugins = "[rabbitmq_management]." if self.management else "[]."
            (node.directory / "enabled_plugins").write_text(plugins + "\n")

    # -- lifecycle ----------------------------------------------------------------

    def _spawn(self, node: Node, detach: bool) -> None:
        if node.alive():
            return
        busy = [
            port
            for port in (node.amqp_port, node.dist_port)
            + ((node.management_port,) if self.management else ())
            if not _port_free(port)
        ]
        if busy:
            raise ClusterError(
                f"{node.name}: port(s) {', '.join(map(str, busy))} already in use"
            )
        with contextlib.suppress(FileNotFoundError):
            node.pid_file.unlink()
        out = open(node.directory / "server.out", "ab")  # noqa: SIM115
        try:
            self._procs[node.name] = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self._env(node),
                cwd=node.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=None if detach else _die_with_parent,
            )
        finally:
            out.close()

    def _await(self, node: Node, timeout: float = START_TIMEOUT_S) -> None:
        """Until ``node`` accepts AMQP connections (its app has booted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self._procs.get(node.name)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(
                    f"{node.name} exited ({proc.returncode}); "
                    f"see {node.directory / 'server.out'} and {node.directory / 'log'}"
                )
            if _port_open(node.amqp_port):
                self.ctl(node, "await_startup", timeout=timeout)
                return
            time.sleep(0.3)
        raise ClusterError(f"{node.name} did not start within {timeout:.0f} s")

    def start(self, detach: bool = False) -> Cluster:
        """Start every node and join them into one cluster (idempotent).

        ``detach``: the nodes outlive this process (the command line); else
        they are sent SIGTERM when it dies, so a killed test run leaves no
        brokers behind.
        """
        problem = available()
        if problem:
            raise ClusterError(problem)
        self._prepare()
        for node in self.nodes:
            self._spawn(node, detach)
        for node in self.nodes:
            self._await(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            if first.name in self.running_nodes(node):
                continue  # already a member (a restart reads its old membership)
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.await_members()
        return self

    def cluster_status(self, node: str | Node | None = None) -> dict:
        target = node or self.nodes[0]
        return json.loads(self.ctl(target, "cluster_status", "--formatter", "json"))

    def running_nodes(self, node: str | Node | None = None) -> list[str]:
        return list(self.cluster_status(node).get("running_nodes", []))

    def await_members(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every node is running and sees every other one."""
        deadline = time.monotonic() + timeout
        want = {n.name for n in self.nodes}
        running: set[str] = set()
        while time.monotonic() < deadline:
            alive = [n for n in self.nodes if n.alive()]
            if len(alive) == len(self.nodes):
                try:
                    running = set(self.running_nodes(alive[0]))
                except ClusterError:
                    running = set()
                if running >= want:
                    return
            time.sleep(0.5)
        raise ClusterError(
            f"the cluster's running nodes are {sorted(running)}, not {sorted(want)}"
        )

    def kill(self, name: str) -> int:
        """``kill -9`` the node's Erlang VM: a crash, no clean shutdown."""
        node = self.node(name)
        pid = node.pid()
        if pid is None:
            raise ClusterError(f"{node.name} has no pid file")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc = self._procs.pop(node.name, None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            if proc is None and not node.alive():
                break
            time.sleep(0.05)
        return pid

    def restart(self, name: str, timeout: float = START_TIMEOUT_S) -> None:
        """Start a stopped (or killed) node again and wait until it has
        rejoined: the cluster's membership is in its data directory, so it
        comes back as a member by itself."""
        node = self.node(name)
        self._spawn(node, detach=False)
        self._await(node, timeout)
        self.await_members(timeout)

    def leader(self, queue: str, vhost: str = "/") -> str:
        """The node leading quorum queue ``queue`` (by a live node's view)."""
        for node in self.nodes:
            if not node.alive():
                continue
            if self.management:
                response = requests.get(
                    f"{self.management_url(node.name)}/api/queues/"
                    f"{quote(vhost, safe='')}/{quote(queue, safe='')}",
                    auth=("guest", "guest"),
                    timeout=10,
                )
                if response.ok and response.json().get("leader"):
                    return response.json()["leader"]
                continue
            rows = json.loads(
                self.ctl(
                    node,
                    "list_queues",
                    "-p",
                    vhost,
                    "name",
                    "leader",
                    "--formatter",
                    "json",
                )  # fmt: skip
            )
            for row in rows:
                if row.get("name") == queue and row.get("leader"):
                    return row["leader"]
        raise ClusterError(f"no node names a leader of queue {queue!r}")

    def stop(self, remove: bool = False) -> None:
        """Stop every node (cleanly if it answers, else ``kill -9``)."""
        for node in reversed(self.nodes):
            if not node.alive():
                continue
            try:
                self.ctl(node, "stop", timeout=60)
            except (ClusterError, subprocess.TimeoutExpired):
                self.kill(node.name)
            proc = self._procs.pop(node.name, None)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def status(self) -> dict:
        """Per node: alive, pid, ports; and the running nodes as one sees them."""
        nodes = {
            node.name: {
                "alive": node.alive(),
                "pid": node.pid(),
                "amqp_port": node.amqp_port,
                "management_port": node.management_port if self.management else None,
                "dist_port": node.dist_port,
            }
            for node in self.nodes
        }
        running: list[str] = []
        for node in self.nodes:
            if node.alive():
                with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                    running = self.running_nodes(node)
                    break
        return {"directory": str(self.directory), "nodes": nodes, "running": running}


# prctl(PR_SET_PDEATHSIG, SIGTERM), as deploy/processes.py does for the
# network's children: a node started for a test run dies with it.
def _die_with_parent() -> None:
    from deploy.processes import _die_with_launcher

    _die_with_launcher()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.cluster")
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", default=None, help="data and logs (default: tmp)")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--no-management", action="store_true")
    parser.add_argument(
        "--remove", action="store_true", help="stop: delete the directory too"
    )
    args = parser.parse_args(argv)
    cluster = Cluster(
        args.dir, args.base_port, args.size, management=not args.no_management
    )
    try:
        if args.command == "start":
            cluster.start(detach=True)
            print(f"cluster up in {cluster.directory}")
            print(f"AMQP_URI={cluster.failover_uri()}")
            if cluster.management:
                print(f"BROKER_ADMIN_URL={cluster.management_url()}")
        elif args.command == "stop":
            cluster.stop(remove=args.remove)
            print("cluster stopped")
        else:
            print(json.dumps(cluster.status(), indent=2))
    except ClusterError as exc:
        print(f"computenet: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
