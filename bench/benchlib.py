"""What the benchmarks share: a throw-away RabbitMQ vhost, and the CPU the
broker, the database and the measured processes spent.

A bench never publishes to a vhost a local network might be using (one left
124 786 events in a registry's queue once); it makes its own through the
management API and deletes it, with everything in it, when done.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import requests

MANAGEMENT = os.environ.get("RABBIT_MANAGEMENT", "http://localhost:15672")
AUTH = ("guest", "guest")


def make_vhost(prefix: str) -> str:
    """A new vhost ``<prefix>_<random>`` the guest user may use fully."""
    vhost = f"{prefix}_{uuid.uuid4().hex[:8]}"
    api = f"{MANAGEMENT}/api"
    requests.put(f"{api}/vhosts/{vhost}", auth=AUTH, timeout=10).raise_for_status()
    try:
        requests.put(
            f"{api}/permissions/{vhost}/guest",
            json={"configure": ".*", "write": ".*", "read": ".*"},
            auth=AUTH,
            timeout=10,
        ).raise_for_status()
    except Exception:
        delete_vhost(vhost)
        raise
    return vhost


def delete_vhost(vhost: str) -> None:
    """Delete ``vhost`` with everything in it."""
    requests.delete(f"{MANAGEMENT}/api/vhosts/{vhost}", auth=AUTH, timeout=10)


def amqp_uri_of(vhost: str) -> str:
    return f"amqp://guest:guest@localhost:5672/{vhost}"


@contextmanager
def throwaway_vhost(prefix: str) -> Iterator[str]:
    """``with throwaway_vhost("bench_rpc") as amqp_uri: …``"""
    vhost = make_vhost(prefix)
    try:
        yield amqp_uri_of(vhost)
    finally:
        delete_vhost(vhost)


# -- where the CPU goes -------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int | str, children: bool = False) -> float:
    """CPU seconds of a process (all its threads), with its reaped children's."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:  # it has gone
        return 0.0
    # utime stime cutime cstime are fields 14-17 of proc(5); 3 is the first here
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def _pids_named(name: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as comm:
                    if comm.read().strip() == name:
                        found.append(pid)
            except OSError:
                continue
    return found


def server_cpu() -> dict[str, float]:
    """CPU seconds so far of this machine's RabbitMQ and PostgreSQL.

    PostgreSQL's backends come and go; a finished one's time is in its
    postmaster's count of reaped children."""
    return {
        "rabbitmq": sum(_cpu_of(pid) for pid in _pids_named("beam.smp")),
        "postgresql": sum(
            _cpu_of(pid, children=True) for pid in _pids_named("postgres")
        ),
    }


class CpuMeter:
    """CPU seconds spent by the broker, the database and named processes
    between :meth:`start` and :meth:`stop` (read from ``/proc``)."""

    def __init__(self, **pids: list[int]):
        self.pids = pids
        self.spent: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {
            **server_cpu(),
            **{name: sum(map(_cpu_of, pids)) for name, pids in self.pids.items()},
        }

    def start(self) -> CpuMeter:
        self._started = self._read()
        return self

    def stop(self) -> dict[str, float]:
        ended = self._read()
        self.spent = {
            name: ended[name] - self._started.get(name, 0.0) for name in ended
        }
        return self.spent

    def line(self, records: int) -> str:
        """``rabbitmq=20.1 postgresql=3.4 … CPU-s (… µs a record)``"""
        per = ", ".join(
            f"{name} {1e6 * spent / records:.0f}" for name, spent in self.spent.items()
        )
        total = sum(self.spent.values())
        cpu = " ".join(f"{name}={spent:.1f}" for name, spent in self.spent.items())
        return f"CPU-s {cpu} total={total:.1f}; µs a record: {per}"
