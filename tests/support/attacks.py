"""Issue 14's attacks, tried against a running network with its members' own
credentials (``var/local-credentials.json``), each beside the legitimate use
of the same door.

The e2e ring runs them against ``make run`` as the launcher starts it
(``tests/e2e/test_local_run.py``); an operator can run them against a live
local network and read the table::

    .venv/bin/python -m tests.support.attacks var/local-credentials.json
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp.exceptions
import requests
from kombu import Connection, Exchange, Producer, Queue

from services.common.principals import uri_as

FED = Exchange("computenet.federation", type="topic", durable=True, passive=True)
RPC = Exchange("nameko-rpc", type="topic", durable=True, passive=True)
USAGE = Exchange("computenet.usage", type="topic", durable=True, passive=True)


@dataclass(frozen=True)
class Attempt:
    who: str
    what: str
    expected: str  # "refused" or "allowed"
    outcome: str  # what happened

    @property
    def held(self) -> bool:
        return self.outcome.startswith(self.expected)


def _bus(uri: str, action: Callable[[Any], None]) -> str:
    """Run ``action(channel)`` with confirms; "allowed" or "refused (…)"."""
    try:
        with Connection(uri, transport_options={"confirm_publish": True}) as conn:
            channel = conn.channel()
            action(channel)
    except (
        amqp.exceptions.AccessRefused,
        amqp.exceptions.PreconditionFailed,
        amqp.exceptions.NotFound,
    ) as exc:
        return f"refused ({type(exc).__name__})"
    return "allowed"


def _publish(exchange: Exchange, key: str, **properties: Any):
    def action(channel) -> None:
        Producer(channel, exchange=exchange).publish(
            {"args": [], "kwargs": {}}, routing_key=key, **properties
        )

    return action


def _bind(exchange: Exchange, key: str, queue: str):
    return lambda channel: Queue(queue, exchange=exchange, routing_key=key)(
        channel
    ).declare()


def _delete(exchange: Exchange):
    return lambda channel: channel.exchange_delete(exchange.name)


def _redeclare(exchange: Exchange, kind: str):
    return lambda channel: Exchange(exchange.name, type=kind, durable=True)(
        channel
    ).declare()


def bus_attempts(credentials: dict[str, Any]) -> list[Attempt]:
    base = credentials["amqp_uri"]
    cities = credentials["cities"]
    datacenters = credentials["datacenters"]
    city, other = sorted(cities)[:2]
    dc, other_dc = sorted(datacenters)[:2]
    city_uri = uri_as(base, **cities[city]["amqp"])
    dc_uri = uri_as(base, **datacenters[dc]["amqp"])
    reply = str(uuid.uuid4())
    plan: list[tuple[str, str, str, str, Callable]] = [
        (
            f"city {city}",
            "check the federation exchange",
            "allowed",
            city_uri,
            lambda ch: FED(ch).declare(),
        ),
        (
            f"city {city}",
            "RPC city_registry.issue_token (a national token)",
            "refused",
            city_uri,
            _publish(RPC, "city_registry.issue_token", reply_to=reply),
        ),
        (
            f"city {city}",
            "RPC city_registry.datacenter_signing_keys",
            "refused",
            city_uri,
            _publish(RPC, "city_registry.datacenter_signing_keys"),
        ),
        (
            f"city {city}",
            "RPC city_registry.remove_city",
            "refused",
            city_uri,
            _publish(RPC, "city_registry.remove_city"),
        ),
        (
            f"city {city}",
            f"RPC vouchers_{other}.revoke_voucher",
            "refused",
            city_uri,
            _publish(RPC, f"vouchers_{other}.revoke_voucher"),
        ),
        (
            f"city {city}",
            "RPC metering.replay_dead_letter",
            "refused",
            city_uri,
            _publish(RPC, "metering.replay_dead_letter"),
        ),
        (
            f"city {city}",
            "RPC as the national side (user_id guest)",
            "refused",
            city_uri,
            _publish(RPC, "city_registry.issue_token", user_id="guest"),
        ),
        (
            f"city {city}",
            "delete computenet.federation",
            "refused",
            city_uri,
            _delete(FED),
        ),
        (
            f"city {city}",
            "redeclare computenet.federation as fanout",
            "refused",
            city_uri,
            _redeclare(FED, "fanout"),
        ),
        (f"city {city}", "delete nameko-rpc", "refused", city_uri, _delete(RPC)),
        (
            f"city {city}",
            f"read {other}.usage_rated",
            "refused",
            city_uri,
            _bind(FED, f"{other}.usage_rated", f"vouchers_{city}.spy"),
        ),
        (
            f"city {city}",
            f"publish {other}.voucher_issued",
            "refused",
            city_uri,
            _publish(FED, f"{other}.voucher_issued"),
        ),
        (
            f"data centre {dc}",
            f"publish {other_dc}.usage",
            "refused",
            dc_uri,
            _publish(USAGE, f"{other_dc}.usage"),
        ),
        (
            f"data centre {dc}",
            "RPC city_registry.issue_token",
            "refused",
            dc_uri,
            _publish(RPC, "city_registry.issue_token"),
        ),
        (
            f"data centre {dc}",
            "read every usage record",
            "refused",
            dc_uri,
            _bind(USAGE, "#", f"{dc}.spy"),
        ),
        (
            f"data centre {dc}",
            "delete computenet.usage",
            "refused",
            dc_uri,
            _delete(USAGE),
        ),
    ]
    return [
        Attempt(who, what, expected, _bus(uri, action))
        for who, what, expected, uri, action in plan
    ]


def portal_attempts(credentials: dict[str, Any]) -> list[Attempt]:
    portal = credentials["portal"]
    vouchers = credentials.get("demo_vouchers") or {}
    code = next(iter(vouchers.values()), None)
    attempts = []

    def get(path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(
            portal + path, headers=headers, timeout=10, allow_redirects=False
        )

    if code:
        answer = get(
            f"/api/v1/datacenters/recommendations?gpu_model=H800&gpus=8&hours=1"
            f"&voucher={code}"
        )
        attempts.append(
            Attempt(
                "anonymous",
                "recommendations with a voucher's balance",
                "refused",
                "refused" if answer.status_code in (401, 403) else "allowed",
            )
        )
        city = {"SH": "shanghai", "CD": "chengdu", "SD": "shandong"}.get(code[:2])
        others = [c for c in credentials["cities"] if c != city]
        if others:
            token = credentials["cities"][others[0]]["admin_token"]
            answer = get(f"/api/v1/vouchers/{code}", token)
            attempts.append(
                Attempt(
                    f"city admin {others[0]}",
                    f"read {city}'s voucher",
                    "refused",
                    "refused" if answer.status_code in (403, 404) else "allowed",
                )
            )
    answer = requests.post(
        portal + "/login",
        data={"token": credentials["national_admin_token"], "next": "/\\evil.example"},
        timeout=10,
        allow_redirects=False,
    )
    location = answer.headers.get("Location", "")
    off_site = "evil.example" in location and not location.startswith("/dashboard")
    attempts.append(
        Attempt(
            "a phishing link",
            "sign-in redirect to /\\evil.example",
            "refused",
            "allowed" if off_site else "refused",
        )
    )
    return attempts


def table(attempts: list[Attempt]) -> str:
    rows = ["| who | attack | expected | outcome |", "| --- | --- | --- | --- |"]
    rows += [f"| {a.who} | {a.what} | {a.expected} | {a.outcome} |" for a in attempts]
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "var/local-credentials.json")
    credentials = json.loads(path.read_text())
    attempts = bus_attempts(credentials) + portal_attempts(credentials)
    print(table(attempts))
    failed = [a for a in attempts if not a.held]
    print(f"attacks={len(attempts)} held={len(attempts) - len(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
