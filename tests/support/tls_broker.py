"""A second RabbitMQ node that speaks only TLS, for the test session.

``tls_broker`` makes a throw-away CA, a server certificate for ``localhost`` /
``127.0.0.1`` and a client certificate (``openssl``), and starts a node of its
own beside the machine's broker: its own name (``computenet-tls-<pid>``), data
and log directories in a tmp dir, an Erlang cookie of its own (``HOME`` is that
tmp dir), no plugins, a distribution port and a TLS listener on free ports,
and **no plain AMQP listener**: whatever reaches it came over TLS. The
machine's node is neither read nor touched. The node is stopped at the end of
the session (and killed if it will not stop, also at interpreter exit).

``tls_vhost`` gives a test a fresh vhost on it: ``(amqps URI, kombu ssl=)``.
Skipped, saying why, when RabbitMQ or openssl is not installed.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.broker_tls import broker_ssl
from services.common.config import AMQP_SSL, AMQP_URI
from tests.support.ports import free_block

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
# Where Debian's packages keep the scripts that /usr/sbin wraps (in `su
# rabbitmq`, which would not keep this environment).
_SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin",)


@dataclass
class TlsBroker:
    node: str
    port: int
    ca_file: Path
    cert_file: Path  # the client's, signed by the CA
    key_file: Path
    user: str
    password: str
    env: dict[str, str]
    ctl_path: str

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n <node> args…``; its output."""
        done = subprocess.run(
            [self.ctl_path, "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"
            )
        return done.stdout

    def uri(self, vhost: str = "") -> str:
        return f"amqps://{self.user}:{self.password}@localhost:{self.port}/{vhost}"

    def ssl_options(self, client_cert: bool = False) -> dict:
        """kombu's ``ssl=`` for this node, through the services' own helper."""
        options = {"ca_certs": str(self.ca_file)}
        if client_cert:
            options |= {"certfile": str(self.cert_file), "keyfile": str(self.key_file)}
        return broker_ssl({AMQP_URI: self.uri(), AMQP_SSL: options})

    def connections(self, vhost: str) -> list[dict[str, str]]:
        """The node's client connections to ``vhost``: name, ssl, protocol."""
        out = self.ctl(
            "list_connections",
            "vhost",
            "ssl",
            "ssl_protocol",
            "peer_port",
            "--no-table-headers",
            "--quiet",
        )
        rows = [line.split("\t") for line in out.splitlines() if line.strip()]
        return [
            {"vhost": r[0], "ssl": r[1], "ssl_protocol": r[2], "peer_port": r[3]}
            for r in rows
            if r[0] == vhost
        ]


def _tool(name: str) -> str | None:
    for directory in (os.environ.get("RABBITMQ_SCRIPTS_DIR"), *_SCRIPT_DIRS):
        if directory and os.access(Path(directory) / name, os.X_OK):
            return str(Path(directory) / name)
    return shutil.which(name)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> tuple[Path, Path, Path, Path, Path]:
    """A throw-away CA (one day) and, signed by it, a server certificate for
    localhost and 127.0.0.1 and a client certificate: ``(ca, server cert,
    server key, client cert, client key)``."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-days", "1", "-subj", "/CN=computenet test CA",
        "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
         "extendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):  # fmt: skip
        (directory / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n" + extensions
        )
        _openssl(
            "req", *ec, "-subj", f"/CN={'localhost' if name == 'server' else name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem",
            cwd=directory,
        )  # fmt: skip
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return tuple(
        directory / name
        for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    )


def _kill(process: subprocess.Popen) -> None:
    """End the node's process group (this session started it, in a group of
    its own), if it is still there."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory) -> Iterator[TlsBroker]:
    server, ctl = _tool("rabbitmq-server"), _tool("rabbitmqctl")
    if server is None or ctl is None:
        pytest.skip("rabbitmq-server is not installed: no TLS node to start")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates for a TLS node")
    base = tmp_path_factory.mktemp("tls-broker")
    ca, cert, key, client_cert, client_key = make_certificates(base / "certs")
    tls_port = free_block(2)
    dist_port = tls_port + 1
    node = f"computenet-tls-{os.getpid()}@localhost"
    # a national user (principals.py): the tests call RPC and publish as it
    user, password = "national.tls", secrets.token_urlsafe(16)
    conf = base / "rabbitmq.conf"
    conf.write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {ca}\n"
        f"ssl_options.certfile = {cert}\n"
        f"ssl_options.keyfile = {key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
        f"default_user = {user}\n"
        f"default_pass = {password}\n"
        "log.console = false\n"
        "log.file.level = info\n"
    )
    plugins = base / "enabled_plugins"
    plugins.write_text("[].\n")
    home = base / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"  # this node's own: nothing shared
    cookie.write_text(secrets.token_hex(16).upper())
    cookie.chmod(0o400)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
        "HOME": str(home),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),  # not /etc's
        "RABBITMQ_CONFIG_FILE": str(conf),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
        "RABBITMQ_PID_FILE": str(base / "node.pid"),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
            "-kernel inet_dist_use_interface {127,0,0,1}"
        ),
    }
    (base / "rabbitmq-env.conf").write_text("")
    log = (base / "startup.log").open("wb")
    process = subprocess.Popen(
        [server],
        env=env,
        cwd=base,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, ended by its id
    )
    atexit.register(_kill, process)
    broker = TlsBroker(
        node, tls_port, ca, client_cert, client_key, user, password, env, ctl
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the TLS node exited ({process.returncode}): "
                    f"{(base / 'startup.log').read_text()[-3000:]}"
                )
            try:
                broker.ctl("await_startup", "--timeout", "10", timeout=30)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield broker
    finally:
        try:
            if process.poll() is None:
                broker.ctl("stop", timeout=STOP_TIMEOUT_S)
                process.wait(timeout=STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - it is killed below either way
            pass
        _kill(process)
        atexit.unregister(_kill)
        log.close()


@pytest.fixture
def tls_vhost(tls_broker) -> Iterator[tuple[str, dict]]:
    """A fresh vhost on the TLS node: ``(amqps URI, kombu ssl=)``, deleted
    after the test."""
    vhost = f"test-{uuid.uuid4().hex[:8]}"
    tls_broker.ctl("add_vhost", vhost)
    tls_broker.ctl("set_permissions", "-p", vhost, tls_broker.user, ".*", ".*", ".*")
    try:
        yield tls_broker.uri(vhost), tls_broker.ssl_options()
    finally:
        tls_broker.ctl("delete_vhost", vhost)
