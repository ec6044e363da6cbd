"""The launcher's own rules: where each process's database is, and what a
newcomer is told when the broker or a port is not available."""

import socket
from pathlib import Path

import pytest

from deploy import demo, localnet
from services.common import creditcode


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
        company["tenant"]
        for companies in demo.DEMO_COMPANIES.values()
        for company in companies
    }
    for dc, names in demo.DEMO_TENANTS.items():
        assert dc in localnet.DEFAULT_DATACENTERS
        assert set(names) <= tenants


@pytest.mark.parametrize(
    "company",
    [c["company"] for companies in demo.DEMO_COMPANIES.values() for c in companies],
    ids=lambda company: company["name"],
)
def test_demo_companies_have_well_formed_credit_codes(company):
    code = company["registration_id"]
    assert creditcode.parse(code) == code


class FakeRegistry:
    """``authenticate`` knows ``roles``; ``reissue_company_token`` makes one."""

    def __init__(self, roles):
        self.roles = dict(roles)
        self.reissued = []

    def call(self, service, method, *args):
        assert service == "city_registry"
        if method == "authenticate":
            role = self.roles.get(args[0])
            return {"role": role} if role else None
        assert method == "reissue_company_token"
        self.reissued.append(args[0])
        token = f"new-{args[0]}"
        self.roles[token] = f"company:{args[0]}"
        return {"token": token, "id": "tok_0000000000000001"}


def test_each_demo_company_gets_a_token_kept_across_runs():
    aurora, tianfu = "91310000MA1DEM001X", "91510100MA1DEM001G"
    vouchers = {
        "aurora-ai": {"code": "SH-B", "company_id": aurora},
        "aurora-2": {"code": "SH-A", "company_id": aurora},
        "tianfu-lab": {"code": "CD-A", "company_id": tianfu},
    }
    registry = FakeRegistry({"kept": f"company:{aurora}", "stale": "national_admin"})
    previous = {aurora: {"token": "kept"}, tianfu: {"token": "stale"}}

    companies = demo.company_tokens(registry, vouchers, previous)

    assert companies == {
        aurora: {"token": "kept", "vouchers": ["SH-A", "SH-B"]},
        tianfu: {"token": f"new-{tianfu}", "vouchers": ["CD-A"]},
    }
    assert registry.reissued == [tianfu]
