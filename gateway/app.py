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
from pathlib import Path
from typing import Any

from flask import Flask, current_app, jsonify
from kombu import Connection

from gateway.api import PREFIX_CACHE, api
from gateway.auth import AUTH_CACHE, TtlCache
from gateway.errors import error_response, register_error_handlers
from services.common import config as cfg
from services.common.rpc import RpcPool
from services.common.telemetry import setup_tracing

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy/config/gateway.yaml"
RPC = "rpc"  # config key (tests) and app.extensions key: the RPC client
LOG_LEVEL = "LOG_LEVEL"
HEALTH_TIMEOUT_S = 2.0

log = logging.getLogger(__name__)


def bus_reachable(amqp_uri: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """True when a connection to the broker opens within ``timeout``."""
    try:
        with Connection(amqp_uri, connect_timeout=timeout) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, timeout=timeout
            )
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        log.warning("bus unreachable: %s", exc)
        return False


def healthz():
    uri = current_app.config[cfg.AMQP_URI]
    if uri is None or not bus_reachable(uri):
        return error_response(503, "bus_unreachable", "the portal cannot reach the bus")
    return jsonify({"status": "ok"})


def _make_rpc(config: dict[str, Any]) -> Any:
    pool = RpcPool(
        config[cfg.AMQP_URI],
        size=int(config.get(cfg.RPC_POOL_SIZE, 8)),
        timeout=float(config.get(cfg.RPC_TIMEOUT_S, 10)),
    )
    atexit.register(pool.close)
    return pool


def create_app(config: dict[str, Any] | None = None) -> Flask:
    if config is None:
        config = cfg.load_config(DEFAULT_CONFIG)
    app = Flask(__name__)
    app.json.sort_keys = False
    app.config[cfg.AMQP_URI] = config.get(cfg.AMQP_URI)
    level = str(config.get(LOG_LEVEL, "INFO")).upper()
    logging.getLogger("gateway").setLevel(level)
    setup_tracing("gateway", config.get(cfg.TRACING))

    app.extensions[RPC] = config[RPC] if RPC in config else _make_rpc(config)
    app.extensions[AUTH_CACHE] = TtlCache()
    app.extensions[PREFIX_CACHE] = TtlCache(max_entries=1)

    register_error_handlers(app)
    app.add_url_rule("/healthz", "healthz", healthz)
    app.register_blueprint(api)
    return app
