"""The portal's fixtures (a pytest plugin, registered by ``tests/conftest.py``):
``create_app`` over a fake RPC client, no broker.

Shared by the portal's unit tests and the security ring (``tests/security``):
``rpc`` (the fake registry and services), ``app`` (or ``make_app(**config)``
for other settings), ``client`` (Flask's test client) and ``token_for`` (a
fresh bearer token of a role). A folder that needs another ``client`` (the
data-centre gateway's unit tests) defines its own in its conftest, which
takes precedence there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from gateway.app import create_app
from gateway.audit import AUDIT, AUDIT_DATABASE_URL
from tests.support.portal_data import NATIONAL


class FakeRpc:
    """Records every call; answers from ``replies[(service, method)]``.

    A reply may be a value, an exception (raised) or a callable (called with
    the arguments). Tokens map to roles through ``roles``. Unless answered
    itself, the registry's ``public_view`` is composed as the registry does it:
    the ``network_summary`` reply beside the ``list_cities`` one.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple, dict]] = []
        self.replies: dict[tuple[str, str], Any] = {}
        self.roles: dict[str, str] = {NATIONAL: "national_admin"}

    def call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((service, method, args, kwargs))
        if (service, method) == ("city_registry", "authenticate"):
            role = self.roles.get(args[0])
            return {"role": role} if role else None
        if (service, method) == ("city_registry", "public_view") and (
            (service, method) not in self.replies
        ):
            return {
                "summary": self._answer("network_summary"),
                "cities": self._answer("list_cities") or [],
            }
        reply = self.replies.get((service, method))
        if isinstance(reply, BaseException):
            raise reply
        if callable(reply):
            return reply(*args, **kwargs)
        return reply

    def _answer(self, method: str) -> Any:
        reply = self.replies.get(("city_registry", method))
        if isinstance(reply, BaseException):
            raise reply
        return reply() if callable(reply) else reply

    def called(self, service: str, method: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for s, m, a, k in self.calls if (s, m) == (service, method)]


@pytest.fixture
def rpc() -> FakeRpc:
    return FakeRpc()


@pytest.fixture
def make_app(rpc, tmp_path) -> Iterator[Callable[..., Flask]]:
    """``make_app(**config)`` → the portal over ``rpc`` with these settings
    too (a whole loaded ``gateway.yaml`` may be given: its bus and audit
    database are replaced by the fake and a file in ``tmp_path``)."""
    made: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = create_app(
            {
                "AMQP_URI": "amqp://guest:guest@127.0.0.1:1/",
                **config,
                "rpc": rpc,
                AUDIT_DATABASE_URL: f"sqlite:///{tmp_path / 'portal.db'}",
            }
        )
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions[AUDIT].dispose()


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def token_for(rpc) -> Callable[[str], dict[str, str]]:
    """``token_for("city_admin:shanghai")`` → headers carrying a fresh token."""

    def make(role: str) -> dict[str, str]:
        token = f"tok-{uuid.uuid4().hex}"
        rpc.roles[token] = role
        return {"Authorization": f"Bearer {token}"}

    return make
