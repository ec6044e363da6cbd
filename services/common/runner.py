"""Run one nameko service as its own process.

``python -m services.<name> --config deploy/config/<name>.yaml`` lands here:
load the one YAML file, migrate the service's database, set up tracing, start
the container, and stop cleanly on SIGTERM or Ctrl-C.
"""

import os

import eventlet

eventlet.monkey_patch()  # before anything opens a socket
# psycopg recognises gevent's patching but not eventlet's: without this it
# waits for PostgreSQL in C, blocking every green thread of the service for the
# length of each query. Its select()-based wait yields to eventlet's hub.
os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_select")

import argparse  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402

import nameko  # noqa: E402
from nameko.runners import ServiceRunner  # noqa: E402

from services.common.amqp import declare_shared_passively, is_member  # noqa: E402
from services.common.broker_tls import with_broker_ssl  # noqa: E402
from services.common.config import (  # noqa: E402
    AMQP_URI,
    DATABASE_URL,
    TRACING,
    ConfigError,
    load_config,
)
from services.common.log_redaction import redact_handlers  # noqa: E402
from services.common.migrations import SERVICES_DIR, upgrade  # noqa: E402
from services.common.principals import NATIONAL_BROKER_USERS  # noqa: E402
from services.common.rpc import node_local_reply_queues, transient_replies  # noqa: E402
from services.common.telemetry import setup_tracing  # noqa: E402

log = logging.getLogger("computenet.runner")


def configure_logging(level: str = "INFO", name: str = "") -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("amqp").setLevel(logging.WARNING)
    logging.getLogger("kombu").setLevel(logging.WARNING)
    redact_handlers()


def main(
    service: str,
    build: Callable[[dict], type],
    argv: list[str] | None = None,
) -> int:
    """Entry point of ``python -m services.<service>``.

    ``build(config)`` returns the nameko service class; it receives the loaded
    configuration so that per-instance names (``vouchers_<city>``) can be set.
    """
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}")
    parser.add_argument(
        "--config",
        default=f"deploy/config/{service}.yaml",
        help="the process's YAML configuration (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = with_broker_ssl(load_config(args.config))
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        return 2
    nameko.config.setup(cfg)
    try:
        service_cls = build(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.get("LOG_LEVEL", "INFO"), service_cls.name)

    if cfg.get(DATABASE_URL) and (SERVICES_DIR / service / "migrations").is_dir():
        upgrade(service, cfg[DATABASE_URL])
        log.info("database migrated")

    setup_tracing(service_cls.name, cfg.get(TRACING), instrument_nameko=True)

    transient_replies()
    node_local_reply_queues()
    if is_member(cfg.get(AMQP_URI) or "", cfg.get(NATIONAL_BROKER_USERS)):
        declare_shared_passively()
    runner = ServiceRunner()
    runner.add_service(service_cls)

    def shutdown(signum, frame):
        # Signal handlers run in the main loop and cannot block on eventlet
        # primitives: stop in a green thread.
        eventlet.spawn_n(runner.stop)

    signal.signal(signal.SIGTERM, shutdown)
    runner.start()
    log.info("started %s", service_cls.name)
    waiter = eventlet.spawn(runner.wait)
    while True:
        try:
            waiter.wait()
        except OSError as exc:  # pragma: no cover - interrupted system call
            if exc.errno == errno.EINTR:
                continue
            raise
        except KeyboardInterrupt:
            try:
                runner.stop()
            except KeyboardInterrupt:
                runner.kill()
        else:
            break
    log.info("stopped %s", service_cls.name)
    return 0
