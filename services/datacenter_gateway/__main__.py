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
import time

from werkzeug.serving import make_server

from services.common.amqp import declare_shared_passively, is_member
from services.common.broker_tls import broker_ssl
from services.common.config import (
    AGENT_TOKEN,
    AMQP_URI,
    CAPACITY_INTERVAL_S,
    DATABASE_URL,
    DATACENTER_ID,
    GPU_MODEL_NAMES,
    HTTP_HOST,
    HTTP_PORT,
    KEY_ID,
    KEY_SECRET,
    NEXT_KEY_FROM,
    NEXT_KEY_ID,
    NEXT_KEY_SECRET,
    RELAY_BATCH_SIZE,
    SLURM_ACCOUNTS,
    SLURM_TENANT_FIELD,
    SLURM_TIMEZONE,
    TAIL_FILE,
    TAIL_INTERVAL_S,
    TRACING,
    ConfigError,
    load_config,
)
from services.common.db import make_engine
from services.common.log_redaction import redact_handlers
from services.common.migrations import upgrade
from services.common.principals import NATIONAL_BROKER_USERS
from services.common.retention import policy_from_config
from services.common.telemetry import setup_tracing
from services.common.units import parse_ts
from services.datacenter_gateway import SERVICE_NAME, domain, parsers
from services.datacenter_gateway.app import _timezone, create_app
from services.datacenter_gateway.capacity import CapacityReporter, load_inventory
from services.datacenter_gateway.outbox import Outbox
from services.datacenter_gateway.relay import Relay, RelayStatus
from services.datacenter_gateway.retention import OutboxPruner
from services.datacenter_gateway.tail import SacctTail

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
    redact_handlers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m services.{SERVICE_NAME}")
    parser.add_argument(
        "--config",
        default=f"deploy/config/{SERVICE_NAME}.yaml",
        help="the process's YAML configuration (default: %(default)s)",
    )
    parser.add_argument(
        "--tail",
        default=None,
        help="follow this file of sacct --parsable2 output (or set TAIL_FILE)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        for key in (DATACENTER_ID, KEY_ID, KEY_SECRET, DATABASE_URL, AMQP_URI):
            if not cfg.get(key):
                raise ConfigError(f"{args.config}: {key} must be set")
        keys = signing_keys(cfg)
        tls = broker_ssl(cfg)
        # A retention below its floor stops the gateway here, at start.
        retention = policy_from_config(cfg)
        host = cfg.get(HTTP_HOST) or "127.0.0.1"
        if not cfg.get(AGENT_TOKEN) and not domain.listens_on_loopback(host):
            raise ConfigError(
                f"{args.config}: AGENT_TOKEN must be set when the gateway listens on "
                f"{host} (only a loopback HTTP_HOST may go without one)"
            )
    except ConfigError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        return 2
    datacenter_id = cfg[DATACENTER_ID]
    _configure_logging(cfg.get("LOG_LEVEL", "INFO"), datacenter_id)

    if is_member(cfg[AMQP_URI], cfg.get(NATIONAL_BROKER_USERS)):
        declare_shared_passively()
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
        keys=keys,
        ssl=tls,
    )
    capacity = CapacityReporter(
        outbox,
        cfg[AMQP_URI],
        datacenter_id,
        cfg[KEY_ID],
        cfg[KEY_SECRET],
        inventory,
        interval_s=float(cfg.get(CAPACITY_INTERVAL_S) or 60),
        keys=keys,
        ssl=tls,
    )
    pruner = OutboxPruner(outbox.engine, retention)
    app = create_app(cfg, outbox, status, inventory)
    tail_path = args.tail or cfg.get(TAIL_FILE)
    tail = None
    if tail_path:
        models = [item.gpu_model for item in inventory]
        names = parsers.GpuModels(cfg.get(GPU_MODEL_NAMES) or {}, models)

        def parse(text, columns):
            return parsers.parse_sacct(
                text,
                tz=_timezone(cfg.get(SLURM_TIMEZONE)),
                columns=columns,
                tenant_field=cfg.get(SLURM_TENANT_FIELD) or "Account",
                tenants=cfg.get(SLURM_ACCOUNTS) or {},
                gpu_models=names,
            )

        tail = SacctTail(
            tail_path,
            outbox,
            datacenter_id,
            parse,
            models,
            interval_s=float(cfg.get(TAIL_INTERVAL_S) or 10),
        )
    port = int(cfg.get(HTTP_PORT) or 8101)
    server = make_server(host, port, app, threaded=True)

    # The handler only records the signal. It runs in the main thread, between
    # any two bytecodes: setting a threading.Event there deadlocked when the
    # signal came while the main thread was inside Event.wait() holding the
    # event's lock (a killed launcher's SIGTERM left a gateway running for
    # good). Logging takes locks too; the main loop logs instead.
    received: list[int] = []

    def request_stop(signum, _frame):
        received.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    http = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    http.start()
    relay.start()
    capacity.start()
    pruner.start()
    if tail is not None:
        tail.start()
        log.info("following %s", tail_path)
    log.info(
        "serving agents on http://%s:%d (keys %s, %d GPU models)",
        host,
        port,
        ", ".join(keys.key_ids),
        len(inventory),
    )
    while not received:
        time.sleep(0.2)
    log.info("%s received, stopping", signal.Signals(received[0]).name)

    # Stop taking records first, then let the relay finish its batch.
    server.shutdown()
    http.join(10)
    if tail is not None:
        tail.stop()
    capacity.stop()
    pruner.stop()
    relay.stop()
    outbox.close()
    log.info("stopped")
    return 0


def signing_keys(cfg) -> domain.SigningKeys:
    """KEY_ID/KEY_SECRET, plus NEXT_KEY_ID/NEXT_KEY_SECRET during a rotation
    (used from NEXT_KEY_FROM, a UTC timestamp, or at once)."""
    current = domain.SigningKey(cfg[KEY_ID], cfg[KEY_SECRET])
    if not cfg.get(NEXT_KEY_ID):
        return domain.SigningKeys(current)
    if not cfg.get(NEXT_KEY_SECRET):
        raise ConfigError("NEXT_KEY_ID is set but NEXT_KEY_SECRET is not")
    start = parse_ts(cfg[NEXT_KEY_FROM]) if cfg.get(NEXT_KEY_FROM) else None
    return domain.SigningKeys(
        current, domain.SigningKey(cfg[NEXT_KEY_ID], cfg[NEXT_KEY_SECRET]), start
    )


if __name__ == "__main__":
    sys.exit(main())
