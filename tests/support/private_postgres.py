"""A PostgreSQL server of the test's own, to restart under a running network.

Restarting the machine's server would break every other test (and other
sessions' runs) sharing it, so a fault test that restarts PostgreSQL gets
its own: Debian's binaries (``/usr/lib/postgresql/<v>/bin``), a data
directory in /tmp, trust authentication on 127.0.0.1 and a free port.
:meth:`PrivatePostgres.restart` is what ``pg_ctlcluster <v> <name> restart``
does (it calls ``pg_ctl restart``, fast mode: open connections are cut and
the server comes back on the same port). Run as the ``postgres`` user when
the tests run as root (``initdb`` refuses root). Skipped, saying why, when
the binaries are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.support.ports import free_block


def _bin_dir() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


class PrivatePostgres:
    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            pytest.skip("PostgreSQL's server binaries are not installed")
        self.bin = bin_dir
        self.port = free_block(1)
        self.dir = Path("/tmp") / f"cn-pg-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()
        self.data = self.dir / "data"
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres")
        self.log = self.dir / "server.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_owner, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def _ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl",
            action,
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-o",
            options,
            *args,
        )

    def start(self) -> None:
        self._ctl("start")
        self.wait_ready()

    def restart(self) -> float:
        """``pg_ctl restart -m fast``; the seconds it was away."""
        began = time.monotonic()
        self._ctl("restart", "-m", "fast")
        self.wait_ready()
        return time.monotonic() - began

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def create_databases(self, prefix: str, names: list[str]) -> str:
        """Databases ``<prefix>_<name>``; their ``DATABASE_URL_TEMPLATE``."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in names:
                conn.execute(f'CREATE DATABASE "{prefix}_{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{prefix}_{{name}}"

    def stop(self) -> None:
        try:
            self._ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)
