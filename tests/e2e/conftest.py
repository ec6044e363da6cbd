"""Shared helpers of the e2e ring: free ports and patient polling."""

from __future__ import annotations

import socket
import time

import pytest
import requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(what, probe, timeout=90.0, interval=0.5):
    """Call ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except (requests.RequestException, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture
def free_port():
    return _free_port


@pytest.fixture
def wait_for():
    return _wait_for
