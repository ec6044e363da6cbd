"""Onboarding survives a failed broker grant (issue 16, item 5).

The registry commits the new city or data centre, then asks RabbitMQ's
management API for the member's user. Here that API sits behind a real HTTP
front that answers 503 while it is "down": the admission fails with
``broker_unavailable``, the member is kept as pending, and the same request
again completes it with credentials that log in to the broker. What the
failed try issued (a data centre's signing key) is revoked.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from kombu import Connection
from nameko.standalone.rpc import ServiceRpcClient

from services.city_registry.broker import (
    BROKER_ADMIN_URL,
    BrokerAdmin,
    city_username,
    datacenter_username,
)
from services.city_registry.service import CityRegistryService
from services.common.config import DATABASE_URL, DEPLOY_DIR, STALE_AFTER_S
from services.common.errors import Conflict, Unavailable
from services.common.migrations import upgrade
from services.common.rpc_access import caller_options
from tests.support.portal_data import datacenter

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANAGEMENT = "http://127.0.0.1:15672"


class FlakyFront:
    """A real HTTP server forwarding to the management API, or answering
    503 to everything while ``down`` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.refused = 0
        front = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if front.down.is_set():
                    front.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                answer = requests.request(
                    self.command,
                    MANAGEMENT + self.path,
                    data=self.rfile.read(length) if length else None,
                    headers={
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() in ("authorization", "content-type")
                    },
                    timeout=10,
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_PUT = do_DELETE = do_POST = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://guest:guest@127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def front():
    server = FlakyFront()
    yield server
    server.close()


@pytest.fixture
def registry_rpc(rabbit_config, pg_url_factory, container_factory, front):
    url = pg_url_factory("city_registry")
    upgrade("city_registry", url)
    container = container_factory(
        CityRegistryService,
        {
            DATABASE_URL: url,
            DEPLOY_DIR: str(DEPLOY),
            STALE_AFTER_S: 60,
            BROKER_ADMIN_URL: front.url,
        },
    )
    container.start()
    with ServiceRpcClient("city_registry", timeout=15, **caller_options()) as client:
        yield client


def _logs_in(rabbit_uri: str, amqp: dict) -> bool:
    """Whether the member's user connects to the test's vhost."""
    vhost = rabbit_uri.rsplit("/", 1)[1]
    uri = f"amqp://{amqp['username']}:{amqp['password']}@127.0.0.1:5672/{vhost}"
    with Connection(uri, connect_timeout=5) as connection:
        connection.connect()
        return connection.connected


def test_a_city_whose_grant_failed_is_admitted_by_the_same_request_again(
    registry_rpc, front, rabbit_uri
):
    front.down.set()
    with pytest.raises(Unavailable) as failed:
        registry_rpc.admit_city("wuhan", "Wuhan", voucher_prefix="WH")
    assert failed.value.code == "broker_unavailable"
    assert front.refused >= 1
    # Kept, with its prefix: not 409 on the retry.
    assert registry_rpc.get_city("wuhan")["voucher_prefix"] == "WH"

    front.down.clear()
    try:
        admitted = registry_rpc.admit_city("wuhan", "Wuhan", voucher_prefix="WH")
        assert admitted["city"]["voucher_prefix"] == "WH"
        assert _logs_in(rabbit_uri, admitted["amqp"])
        assert registry_rpc.authenticate(admitted["admin_token"])["role"] == (
            "city_admin:wuhan"
        )
        # Onboarded: now a third admission is the 409 it always was.
        with pytest.raises(Conflict) as again:
            registry_rpc.admit_city("wuhan", "Wuhan")
        assert again.value.code == "city_exists"
    finally:
        BrokerAdmin.from_config({"AMQP_URI": rabbit_uri}).delete_user(
            city_username("wuhan")
        )


def test_a_datacenter_whose_grant_failed_is_registered_by_the_same_request_again(
    registry_rpc, front, rabbit_uri
):
    registration = datacenter(id="wuhan-dc-01", operator="op", city="wuhan")
    front.down.set()
    with pytest.raises(Unavailable):
        registry_rpc.register_datacenter(registration)
    stranded = registry_rpc.list_datacenter_keys("wuhan-dc-01")
    assert [key["revoked_at"] for key in stranded] == [None]  # issued, not delivered

    front.down.clear()
    try:
        registered = registry_rpc.register_datacenter(registration)
        assert _logs_in(rabbit_uri, registered["amqp"])
        assert registry_rpc.authenticate(registered["token"])["role"] == (
            "datacenter:wuhan-dc-01"
        )
        keys = {
            k["key_id"]: k for k in registry_rpc.list_datacenter_keys("wuhan-dc-01")
        }
        assert keys[registered["key_id"]]["revoked_at"] is None
        (old,) = [k for k in keys.values() if k["key_id"] != registered["key_id"]]
        assert old["revoked_at"] is not None  # the failed try's key never left
        assert [
            k["key_id"] for k in registry_rpc.datacenter_signing_keys("wuhan-dc-01")
        ] == [registered["key_id"]]
        with pytest.raises(Conflict):
            registry_rpc.register_datacenter(registration)
    finally:
        BrokerAdmin.from_config({"AMQP_URI": rabbit_uri}).delete_user(
            datacenter_username("wuhan-dc-01")
        )
