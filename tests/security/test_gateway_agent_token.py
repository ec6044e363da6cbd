"""A data-centre gateway that anyone on the network could reach must not
accept usage without the agent token (DESIGN.md §8): it refuses to start
listening beyond loopback with no ``AGENT_TOKEN``. Each attack beside the
legitimate path, on the real process as operators start it."""

from __future__ import annotations

import os
import subprocess

import nameko
import pytest
import requests

from services.datacenter_gateway.domain import listens_on_loopback
from tests.support.polling import eventually
from tests.support.ports import free_block
from tests.support.processes import ROOT, service_command, start_service, stop


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"]
)
def test_loopback_hosts_are_reachable_from_this_machine_only(host):
    assert listens_on_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gw.example.org", ""])
def test_every_other_host_may_be_reached_from_elsewhere(host):
    assert not listens_on_loopback(host)


def _env(tmp_path, rabbit_config, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        AMQP_URI=nameko.config["AMQP_URI"],  # the test's own vhost (rabbit_config)
        HTTP_PORT=str(free_block(1)),
        DATACENTER_ID="guian-gov-01",
        KEY_ID="guian-gov-01-k1",
        KEY_SECRET="s3cret-key",
        DATABASE_URL=f"sqlite:///{tmp_path / 'outbox.db'}",
        CAPACITY_INTERVAL_S="3600",
    )
    env.pop("AGENT_TOKEN", None)
    env.update(extra)
    return env


def test_a_gateway_open_to_the_network_without_a_token_refuses_to_start(
    tmp_path, rabbit_config
):
    env = _env(tmp_path, rabbit_config, HTTP_HOST="0.0.0.0")
    done = subprocess.run(
        service_command("datacenter_gateway"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "AGENT_TOKEN must be set when the gateway listens on 0.0.0.0" in done.stderr
    assert not (tmp_path / "outbox.db").exists()  # refused before anything else


def test_a_gateway_open_to_the_network_with_a_token_serves_its_agents(
    tmp_path, rabbit_config
):
    env = _env(tmp_path, rabbit_config, HTTP_HOST="0.0.0.0", AGENT_TOKEN="t0k")
    port = env["HTTP_PORT"]
    process = start_service(
        "datacenter_gateway", env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/status"

        anonymous = eventually(
            lambda: requests.get(url, timeout=2).status_code,
            60,
            "the gateway to listen",
            ignoring=(OSError,),
        )
        assert anonymous == 401  # no token: refused
        with_token = requests.get(
            url, headers={"Authorization": "Bearer t0k"}, timeout=5
        )
        assert with_token.status_code == 200
    finally:
        stop(process)
