"""The data-centre gateway process.

``python -m services.datacenter_gateway --config deploy/config/datacenter_gateway.yaml``

Load the one YAML file, migrate the outbox, start the relay and capacity
threads and the HTTP server (threaded werkzeug), stop cleanly on SIGTERM or
Ctrl-C. Plain threads, no eventlet: this process owns its loops.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from werkzeug.serving import make_server

from services.common.config import (
    AMQP_URI,
    CAPACITY_INTERVAL_S,
    DATABASE_URL,
    DATACENTER_ID,
    HTTP_HOST,
    HTTP_PORT,
    KEY_ID,
    KEY_SECRET,
    RELAY_BATCH_SIZE,
    TRACING,
    ConfigError,
    load_config,
)
from services.common.db import make_engine
from services.common.migrations import upgrade
from services.common.telemetry import setup_tracing
from services.datacenter_gateway import SERVICE_NAME
from services.datacenter_gateway.app import create_app
from services.datacenter_gateway.capacity import CapacityReporter, load_inventory
from services.datacenter_gateway.outbox import Outbox
from services.datacenter_gateway.relay import Relay, RelayStatus

log = logging.getLogger("computenet.datacenter_gateway")


def _configure_logging(level: str, datacenter_id: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {SERVICE_NAME}[{datacenter_id}] %(levelname)s %(name)s: "
        "%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("amqp", "kombu", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m services.{SERVICE_NAME}")
    parser.add_argument(
        "--config",
        default=f"deploy/config/{SERVICE_NAME}.yaml",
        help="the process's YAML configuration (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        for key in (DATACENTER_ID, KEY_ID, KEY_SECRET, DATABASE_URL, AMQP_URI):
            if not cfg.get(key):
                raise ConfigError(f"{args.config}: {key} must be set")
    except ConfigError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        return 2
    datacenter_id = cfg[DATACENTER_ID]
    _configure_logging(cfg.get("LOG_LEVEL", "INFO"), datacenter_id)

    upgrade(SERVICE_NAME, cfg[DATABASE_URL])
    log.info("outbox migrated")
    setup_tracing(SERVICE_NAME, cfg.get(TRACING))

    outbox = Outbox(make_engine(cfg[DATABASE_URL]))
    inventory = load_inventory(cfg)
    status = RelayStatus()
    relay = Relay(
        outbox,
        cfg[AMQP_URI],
        datacenter_id,
        cfg[KEY_ID],
        cfg[KEY_SECRET],
        batch_size=int(cfg.get(RELAY_BATCH_SIZE) or 500),
        status=status,
    )
    capacity = CapacityReporter(
        outbox,
        cfg[AMQP_URI],
        datacenter_id,
        cfg[KEY_ID],
        cfg[KEY_SECRET],
        inventory,
        interval_s=float(cfg.get(CAPACITY_INTERVAL_S) or 60),
    )
    app = create_app(cfg, outbox, status, inventory)
    host, port = cfg.get(HTTP_HOST) or "127.0.0.1", int(cfg.get(HTTP_PORT) or 8101)
    server = make_server(host, port, app, threaded=True)

    stopping = threading.Event()

    def request_stop(signum, _frame):
        log.info("%s received, stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    http = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    http.start()
    relay.start()
    capacity.start()
    log.info(
        "serving agents on http://%s:%d (key %s, %d GPU models)",
        host,
        port,
        cfg[KEY_ID],
        len(inventory),
    )
    while not stopping.wait(0.5):
        pass

    # Stop taking records first, then let the relay finish its batch.
    server.shutdown()
    http.join(10)
    capacity.stop()
    relay.stop()
    outbox.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
