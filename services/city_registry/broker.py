"""RabbitMQ users for cities and data centres, through the management HTTP API.

The registry hands each admitted city and registered data centre its own AMQP
user. What that user may touch is decided here, in one place, as regular
expressions (``configure``/``write``/``read`` on resources) plus topic
permissions (routing keys on a topic exchange); docs/security.md prints them
(generated, and tested to match):

- a city (``city.<code>``) runs ``vouchers_<code>``: it declares and consumes
  its RPC queue ``rpc-vouchers_<code>`` and its queue
  ``vouchers_<code>.usage_rated``, and publishes its facts on
  ``computenet.federation`` — only with routing keys ``<code>.*``, and binds
  there only ``<code>.*`` (so it cannot read another city's ``usage_rated``).
  On ``nameko-rpc`` it binds only ``vouchers_<code>.*`` (so it cannot take
  another service's calls) and publishes only replies, whose routing key is
  the caller's reply-queue id (a UUID): it cannot send a request to any
  service (``city_registry.issue_token`` is refused by the broker, and by
  the registry's own check of the caller, services/common/rpc_access.py).
- a data centre (``dc.<id>``) publishes on ``computenet.usage`` only, and
  only ``<id>.*`` (its ``usage``, ``capacity`` and ``binding`` requests);
  it declares no queue and reads nothing.

No member may configure a shared exchange (declare, redeclare or delete it):
the national side declares them (``services/common/amqp.py``,
``SharedTopology``) and members only check that they exist (a passive
declare, which needs no permission). Configure covers a member's own queues
and nothing else.

Removing a city or data centre deletes its user: RabbitMQ closes its
connections and refuses new ones, so it can no longer publish.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import requests
from nameko import config
from nameko.extensions import DependencyProvider

from services.common.config import AMQP_URI

log = logging.getLogger("computenet.city_registry")

# Config key: e.g. http://guest:guest@localhost:15672 (default: the AMQP URI's
# host and credentials, port 15672).
BROKER_ADMIN_URL = "BROKER_ADMIN_URL"
MANAGEMENT_PORT = 15672
TIMEOUT_S = 10.0

FEDERATION = "computenet.federation"
USAGE = "computenet.usage"
DEAD = "computenet.dead"
NAMEKO_RPC = "nameko-rpc"


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str
    # exchange → (write, read) routing-key patterns
    topics: dict[str, tuple[str, str]]


# The routing key of an RPC reply: the caller's reply-queue id, a UUID (nameko's
# ReplyListener and standalone client both bind their queue by it).
REPLY_KEY = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
NOTHING = "^$"


def _alternatives(*names: str) -> str:
    return "^(" + "|".join(names) + ")$"


def city_username(code: str) -> str:
    return f"city.{code}"


def datacenter_username(datacenter_id: str) -> str:
    return f"dc.{datacenter_id}"


def city_permissions(code: str) -> Permissions:
    """What ``vouchers_<code>`` needs, and nothing of another city's."""
    own_queues = (
        re.escape(f"rpc-vouchers_{code}"),
        re.escape(f"vouchers_{code}.") + r"[a-z_]+",
    )
    exchanges = (re.escape(FEDERATION), re.escape(NAMEKO_RPC))
    own_key = "^" + re.escape(f"{code}.")
    return Permissions(
        configure=_alternatives(*own_queues),
        # Declaring a dead-lettered queue needs write on the dead-letter exchange.
        write=_alternatives(*exchanges, re.escape(DEAD), *own_queues),
        read=_alternatives(*exchanges, *own_queues),
        topics={
            FEDERATION: (own_key, own_key),
            NAMEKO_RPC: (REPLY_KEY, "^" + re.escape(f"vouchers_{code}.")),
        },
    )


def datacenter_permissions(datacenter_id: str) -> Permissions:
    own_key = "^" + re.escape(f"{datacenter_id}.")
    return Permissions(
        configure=NOTHING,
        write=_alternatives(re.escape(USAGE)),
        read=NOTHING,
        topics={USAGE: (own_key, NOTHING)},
    )


def management_target(amqp_uri: str, admin_url: str | None) -> tuple[str, tuple, str]:
    """``(base url, (user, password), vhost)`` from the configuration; of a
    cluster's failover URI, the first node (users and vhosts are cluster-wide,
    so any node's management API will do; ``BROKER_ADMIN_URL`` names it when
    its port is not the default)."""
    amqp = urlsplit(amqp_uri.split(";", 1)[0].strip())
    vhost = unquote(amqp.path[1:]) if amqp.path not in ("", "/") else "/"
    source = urlsplit(admin_url) if admin_url else None
    host = (source.hostname if source else amqp.hostname) or "localhost"
    port = (source.port if source else None) or MANAGEMENT_PORT
    scheme = source.scheme if source else "http"
    user = unquote((source.username if source else amqp.username) or "guest")
    password = unquote((source.password if source else amqp.password) or "guest")
    return f"{scheme}://{host}:{port}", (user, password), vhost


class BrokerAdmin:
    """The few management-API calls the registry makes."""

    def __init__(self, base_url: str, auth: tuple[str, str], vhost: str):
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.vhost = vhost
        self.http = requests.Session()

    @classmethod
    def from_config(cls, config: dict) -> BrokerAdmin:
        return cls(*management_target(config[AMQP_URI], config.get(BROKER_ADMIN_URL)))

    def _url(self, *parts: str) -> str:
        return self.base_url + "/api/" + "/".join(quote(p, safe="") for p in parts)

    def _send(self, method: str, url: str, **kwargs) -> requests.Response:
        response = self.http.request(
            method, url, auth=self.auth, timeout=TIMEOUT_S, **kwargs
        )
        if response.status_code >= 400 and not (
            method == "DELETE" and response.status_code == 404
        ):
            response.raise_for_status()
        return response

    def grant(self, username: str, password: str, perms: Permissions) -> None:
        """Create (or reset) ``username`` with exactly ``perms`` on our vhost."""
        self._send(
            "PUT", self._url("users", username), json={"password": password, "tags": ""}
        )
        self._send(
            "PUT",
            self._url("permissions", self.vhost, username),
            json={
                "configure": perms.configure,
                "write": perms.write,
                "read": perms.read,
            },
        )
        for exchange, (write, read) in perms.topics.items():
            self._send(
                "PUT",
                self._url("topic-permissions", self.vhost, username),
                json={"exchange": exchange, "write": write, "read": read},
            )

    def delete_user(self, username: str) -> None:
        """Delete the user; RabbitMQ closes its connections. Absent is fine."""
        self._send("DELETE", self._url("users", username))

    def user_exists(self, username: str) -> bool:
        response = self.http.get(
            self._url("users", username), auth=self.auth, timeout=TIMEOUT_S
        )
        return response.status_code == 200


class Broker(DependencyProvider):
    """Injects a :class:`BrokerAdmin` for the registry's vhost."""

    def setup(self):
        self.admin = BrokerAdmin.from_config(config)

    def get_dependency(self, worker_ctx) -> BrokerAdmin:
        return self.admin
