"""RPC by caller: the entrypoint that authorises, and the clients that identify.

``@rpc`` here is nameko's entrypoint plus one check before the worker starts:
the request's ``user_id`` property, which RabbitMQ has validated against the
user of the connection that published it, must name a principal that
:data:`services.common.principals.RPC_CALLERS` allows for this method. A
request without one, or from a member, is answered ``Forbidden``
(``rpc_forbidden``) and never reaches the method. Every service imports
``rpc`` from here, never from nameko (a unit test holds this).

The callers set ``user_id`` to the user they connect as: ``ServiceRpc`` and
``ClusterRpc`` here for services, :class:`services.common.rpc.Client` for the
portal, the launcher and the CLI.
"""

from __future__ import annotations

import logging
from typing import Any

import nameko.rpc
from nameko import config
from nameko.constants import AMQP_URI_CONFIG_KEY, DEFAULT_AMQP_URI

import services.common.remote_errors  # noqa: F401 - Forbidden crosses RPC as itself
from services.common.errors import Forbidden
from services.common.principals import (
    NATIONAL_BROKER_USERS,
    may_call,
    national_users,
    principal_of,
    username_of,
)

log = logging.getLogger("computenet.rpc")


class Rpc(nameko.rpc.Rpc):
    """nameko's RPC entrypoint, refusing callers the table does not allow."""

    def setup(self) -> None:
        super().setup()
        self.national = national_users(config.get(NATIONAL_BROKER_USERS))

    def handle_message(self, body: Any, message: Any) -> None:
        user = (message.properties or {}).get("user_id")
        caller = principal_of(user, self.national)
        service = self.container.service_name
        if not may_call(service, self.method_name, caller):
            log.warning(
                "refused %s.%s to broker user %r", service, self.method_name, user
            )
            # Raised here, the RPC consumer answers it as the call's error
            # and acks the request: the method never runs.
            raise Forbidden(
                "rpc_forbidden",
                f"{user or 'an unidentified caller'} may not call "
                f"{service}.{self.method_name}",
                {"service": service, "method": self.method_name, "user_id": user},
            )
        super().handle_message(body, message)


rpc = Rpc.decorator


class _Identified:
    """Publishes every request with ``user_id`` = the user it connects as."""

    amqp_uri: str
    publisher_options: dict

    def setup(self) -> None:
        uri = self.publisher_options.get("uri") or self.amqp_uri
        self.publisher_options.setdefault("user_id", username_of(uri))
        super().setup()  # type: ignore[misc]


class ServiceRpc(_Identified, nameko.rpc.ServiceRpc):
    """nameko's ``ServiceRpc``, identified (see :class:`Rpc`)."""


class ClusterRpc(_Identified, nameko.rpc.ClusterRpc):
    """nameko's ``ClusterRpc``, identified (see :class:`Rpc`)."""


def caller_options(amqp_uri: str | None = None) -> dict[str, str]:
    """Publisher options identifying a standalone client: ``{"user_id": …}``."""
    uri = amqp_uri or config.get(AMQP_URI_CONFIG_KEY, DEFAULT_AMQP_URI)
    return {"user_id": username_of(uri)}
