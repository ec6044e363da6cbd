"""Pre-flight checks of ``make run`` and ``make test``: is RabbitMQ reachable, is
PostgreSQL, is a port free; each answers with one line saying why not, and the
command that starts what is missing.
"""

from __future__ import annotations

import socket


def broker_problem(amqp_uri: str, timeout: float = 3.0) -> str | None:
    """One line saying why RabbitMQ cannot be used, or None if it can."""
    from kombu import Connection

    try:
        with Connection(amqp_uri, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return (
            f"RabbitMQ is not reachable at {_redact(amqp_uri)} "
            f"({exc.__class__.__name__}); "
            "start it with: rabbitmq-server -detached"
        )
    return None


def postgres_problem(url: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3):
            pass
    except Exception as exc:  # noqa: BLE001
        return (
            f"PostgreSQL is not reachable at {url} ({exc.__class__.__name__}); "
            "start it with: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        )
    return None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _redact(uri: str) -> str:
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri
