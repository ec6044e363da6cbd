"""What the benchmarks share: a throw-away RabbitMQ vhost.

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


@contextmanager
def throwaway_vhost(prefix: str) -> Iterator[str]:
    """``with throwaway_vhost("bench_rpc") as amqp_uri: …``"""
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
        yield f"amqp://guest:guest@localhost:5672/{vhost}"
    finally:
        requests.delete(f"{api}/vhosts/{vhost}", auth=AUTH, timeout=10)
