"""Shared machinery of the e2e ring: free ports, PostgreSQL databases per
process, and the network itself started as processes by
``python -m deploy.localnet run`` on the test's own RabbitMQ vhost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.polling import eventually_over_http
from tests.support.ports import free_block

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PG = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Every process `make run` starts that has a database of its own.
NETWORK_DATABASES = [
    "city_registry",
    "metering",
    "vouchers_shanghai",
    "vouchers_chengdu",
    "vouchers_shandong",
    "datacenter_gateway_guian-gov-01",
    "datacenter_gateway_lingang-com-01",
    "portal",
]


@pytest.fixture
def free_port():
    """``free_port()`` → a port free now, outside the ephemeral range."""
    return lambda: free_block(1)


@pytest.fixture
def pg_databases():
    """``pg_databases(*extra)`` → a ``DATABASE_URL_TEMPLATE`` whose ``{name}``
    databases exist for every process of the network and each extra name
    (fresh, dropped after the test)."""
    created: list[str] = []
    base = ADMIN_PG.rsplit("/", 1)[0]

    def make(*extra: str) -> str:
        prefix = f"cn_e2e_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(ADMIN_PG, autocommit=True) as conn:
            for name in [*NETWORK_DATABASES, *extra]:
                conn.execute(f'CREATE DATABASE "{prefix}_{name}"')
                created.append(f"{prefix}_{name}")
        return f"{base}/{prefix}_{{name}}"

    yield make
    with psycopg.connect(ADMIN_PG, autocommit=True) as conn:
        for database in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@dataclass
class LaunchedNetwork:
    """A running ``deploy.localnet`` and what it wrote."""

    process: subprocess.Popen
    var_dir: Path
    env: dict[str, str]
    credentials: dict[str, Any] = field(default_factory=dict)
    output: str = ""

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """Ctrl-C (by default) and wait; returns the launcher's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        self.output += (out or b"").decode(errors="replace")
        return self.process.returncode

    def logs(self, lines: int = 30) -> str:
        parts = [self.output[-3000:]]
        for log in sorted((self.var_dir / "log").glob("*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            parts.append(f"--- {log.name}\n{tail}")
        return "\n".join(parts)


@pytest.fixture
def launch_network(rabbit_uri, tmp_path):
    """``launch_network(*args, env={...})`` starts the network on the test's
    vhost and waits for its credentials file; a launcher that dies while
    starting fails the test at once with its output. Stopped after the test."""
    launched: list[LaunchedNetwork] = []

    def launch(*args: str, env: dict[str, str] | None = None, timeout=150):
        var_dir = tmp_path / f"var{len(launched) or ''}"
        ports = free_block(1 + 4)
        environ = dict(os.environ, AMQP_URI=rabbit_uri, PYTHONUNBUFFERED="1")
        environ.pop("DATABASE_URL_TEMPLATE", None)
        environ.update(env or {})
        command = [
            sys.executable,
            "-m",
            "deploy.localnet",
            "run",
            "--var-dir",
            str(var_dir),
            "--quiet",
            # One block of ports: the portal, then one per data centre.
            "--portal-port",
            str(ports),
            "--gateway-port",
            str(ports + 1),
            *args,
        ]
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        network = LaunchedNetwork(process, var_dir, environ)
        launched.append(network)
        credentials = var_dir / "local-credentials.json"

        def started() -> bool:
            if process.poll() is not None:
                network.stop()
                raise AssertionError(
                    f"the network exited with {process.returncode}:\n{network.logs()}"
                )
            return credentials.exists()

        eventually_over_http(started, timeout, "the network to start")
        network.credentials = json.loads(credentials.read_text())
        return network

    yield launch
    for network in reversed(launched):
        network.stop()
        print(network.logs())
