"""The national portal's Flask application: ``create_app(config=None)``.

Run it with ``gunicorn -b 127.0.0.1:8000 -w 1 --threads 8
'gateway.app:create_app()'``. Configuration comes from
``deploy/config/gateway.yaml`` (``${ENV:default}``) unless a dict is given;
tests pass ``{"rpc": fake}``, any object with ``call(service, method, *args,
**kwargs)``, instead of a pool of nameko clients on the bus.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

from flask import Flask, current_app, jsonify
from kombu import Connection

from gateway import audit, audit_retention, directory
from gateway.api import (
    PUBLIC_CACHE_TTL_S,
    PUBLIC_VIEW,
    api,
    make_public_view,
)
from gateway.auth import AUTH_CACHE, AuthCache
from gateway.bindings_api import bindings
from gateway.companies import companies
from gateway.dashboard import dashboard
from gateway.errors import error_response, register_error_handlers
from gateway.federation_api import federation
from gateway.integrity import integrity_api
from gateway.parked_api import parked
from gateway.review_api import review
from gateway.statements_api import statements
from services.common import config as cfg
from services.common.broker_tls import broker_ssl
from services.common.http_limits import limit_body_size
from services.common.log_redaction import redact_handlers
from services.common.rpc import RpcPool
from services.common.telemetry import make_exporter, setup_tracing

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy/config/gateway.yaml"
RPC = "rpc"  # config key (tests) and app.extensions key: the RPC client
LOG_LEVEL = "LOG_LEVEL"
# Signs the dashboard's session cookie. Without it a random key per process
# is used: fine for one worker, but then a restart signs everyone out.
SECRET_KEY = "SECRET_KEY"
# True when the portal is served over HTTPS (PORTAL_HTTPS): the browser then
# sends the session cookie over HTTPS only. False by default, as ``make run``
# serves plain HTTP on localhost and a Secure cookie would never come back.
SESSION_COOKIE_SECURE = "SESSION_COOKIE_SECURE"
# The portal's bodies are small JSON documents and a sign-in form (the largest,
# a data centre's registration with its inventory, is a few kilobytes):
# 1 MiB is hundreds of times that, and bounds what one request may make the
# portal read.
DEFAULT_MAX_CONTENT_LENGTH = 1024 * 1024
HEALTH_TIMEOUT_S = 2.0

log = logging.getLogger(__name__)


def bus_reachable(
    amqp_uri: str, timeout: float = HEALTH_TIMEOUT_S, ssl: dict | None = None
) -> bool:
    """True when a connection to the broker opens within ``timeout``."""
    try:
        with Connection(amqp_uri, connect_timeout=timeout, ssl=ssl) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, timeout=timeout
            )
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        log.warning("bus unreachable: %s", exc)
        return False


def healthz():
    uri = current_app.config[cfg.AMQP_URI]
    if uri is None or not bus_reachable(uri, ssl=current_app.config[cfg.AMQP_SSL]):
        return error_response(503, "bus_unreachable", "the portal cannot reach the bus")
    return jsonify({"status": "ok"})


def _make_rpc(config: dict[str, Any]) -> Any:
    pool = RpcPool(
        config[cfg.AMQP_URI],
        size=int(config.get(cfg.RPC_POOL_SIZE, 8)),
        timeout=float(config.get(cfg.RPC_TIMEOUT_S, 10)),
        ssl=broker_ssl(config),
    )
    atexit.register(pool.close)
    return pool


def _instrument(app: Flask, settings: dict[str, Any] | None, provider) -> None:
    """A span per request, once, at app creation, when tracing is configured.

    opentelemetry-instrumentation-flask has no release matching our
    instrumentation 0.66b2; its WSGI middleware, which it wraps, does the job.
    ``provider`` is None when this process set tracing up earlier (the global
    provider is then used)."""
    if make_exporter(settings) is None:
        return
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app, tracer_provider=provider)


def _flag(config: dict[str, Any], key: str) -> bool:
    """A true/false setting: a typo such as ``PORTAL_HTTPS=ture`` is an error,
    not a truthy string that would pass for yes."""
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise cfg.ConfigError(f"{key} must be true or false, not {value!r}")
    return value


def create_app(config: dict[str, Any] | None = None) -> Flask:
    if config is None:
        config = cfg.load_config(DEFAULT_CONFIG)
    app = Flask(__name__)
    app.json.sort_keys = False
    app.config.update(
        SECRET_KEY=config.get(SECRET_KEY) or os.urandom(32).hex(),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=_flag(config, SESSION_COOKIE_SECURE),
    )
    limit_body_size(
        app,
        int(config.get(cfg.MAX_CONTENT_LENGTH) or DEFAULT_MAX_CONTENT_LENGTH),
    )
    app.config[cfg.AMQP_URI] = config.get(cfg.AMQP_URI)
    app.config[cfg.AMQP_SSL] = broker_ssl(config)
    level = str(config.get(LOG_LEVEL, "INFO")).upper()
    logging.getLogger("gateway").setLevel(level)
    for logger in (logging.getLogger(), logging.getLogger("gunicorn.error")):
        redact_handlers(logger)
    provider = setup_tracing("gateway", config.get(cfg.TRACING))
    _instrument(app, config.get(cfg.TRACING), provider)

    app.extensions[RPC] = config[RPC] if RPC in config else _make_rpc(config)
    app.extensions[AUTH_CACHE] = AuthCache()
    directory.install(app, app.extensions[RPC])
    app.config[PUBLIC_CACHE_TTL_S] = float(config.get(PUBLIC_CACHE_TTL_S, 1.0))
    app.extensions[PUBLIC_VIEW] = make_public_view(
        app, app.extensions[RPC], app.config[PUBLIC_CACHE_TTL_S]
    )

    audit.init_app(app, config.get(audit.AUDIT_DATABASE_URL) or audit.DEFAULT_AUDIT_URL)
    audit_retention.init_app(app, config)
    register_error_handlers(app)
    app.add_url_rule("/healthz", "healthz", healthz)
    app.register_blueprint(api)
    app.register_blueprint(dashboard)
    app.register_blueprint(federation)
    app.register_blueprint(companies)
    app.register_blueprint(review)
    app.register_blueprint(bindings)
    app.register_blueprint(integrity_api)
    app.register_blueprint(parked)
    app.register_blueprint(statements)
    return app
