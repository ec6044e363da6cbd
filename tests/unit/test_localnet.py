"""The launcher's own rules: where each process's database is, and what a
newcomer is told when the broker or a port is not available."""

import socket
from pathlib import Path

from deploy import localnet


def test_databases_default_to_sqlite_files_under_var(tmp_path):
    spec = localnet.NetworkSpec(var_dir=tmp_path, environ={})
    assert (
        spec.database_url("vouchers_chengdu")
        == f"sqlite:///{tmp_path}/vouchers_chengdu.db"
    )


def test_a_template_switches_every_process_and_an_override_wins():
    spec = localnet.NetworkSpec(
        var_dir=Path("/x"),
        environ={
            "DATABASE_URL_TEMPLATE": "postgresql://pg/cn_{name}",
            "METERING_DATABASE_URL": "postgresql://other/metering",
        },
    )
    assert spec.database_url("city_registry") == "postgresql://pg/cn_city_registry"
    assert spec.database_url("metering") == "postgresql://other/metering"


def test_an_unreachable_broker_is_one_line_with_the_fix():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once closed
    problem = localnet.broker_problem(
        f"amqp://guest:secret@127.0.0.1:{port}/", timeout=1
    )
    assert problem is not None and "\n" not in problem
    assert "rabbitmq-server -detached" in problem
    assert "secret" not in problem


def test_a_busy_port_is_seen():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not localnet.port_free(sock.getsockname()[1])


def test_demo_tenants_hold_vouchers_of_known_cities():
    tenants = {
        demo["tenant"] for demos in localnet.DEMO_COMPANIES.values() for demo in demos
    }
    for dc, names in localnet.DEMO_TENANTS.items():
        assert dc in localnet.DEFAULT_DATACENTERS
        assert set(names) <= tenants
