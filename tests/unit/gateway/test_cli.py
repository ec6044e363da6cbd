"""``computenet`` against a fake portal: the real Flask app over a fake RPC.

The CLI's HTTP session is replaced by one that routes each request to the
app's test client, so a command goes through the real views, schemas, roles
and error table (no broker, no network).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import requests
from click.testing import CliRunner

from gateway import cli
from services.vouchers import rules

CITY_TOKEN = "tok-shanghai-admin"


class AppSession:
    """Just enough of ``requests.Session`` to put the CLI in front of the app."""

    def __init__(self, client):
        self.client = client
        self.requests: list[tuple[str, str, dict]] = []

    def request(self, method, url, json=None, params=None, headers=None, timeout=None):
        path = urlsplit(url).path
        self.requests.append((method, path, dict(headers or {})))
        answer = self.client.open(
            path, method=method, json=json, query_string=params, headers=headers
        )
        response = requests.Response()
        response.status_code = answer.status_code
        response._content = answer.get_data()
        response.headers.update(dict(answer.headers))
        return response


@pytest.fixture
def session(client, monkeypatch):
    fake = AppSession(client)
    monkeypatch.setattr(cli, "make_session", lambda: fake)
    return fake


@pytest.fixture
def credentials(tmp_path, rpc):
    rpc.roles[CITY_TOKEN] = "city_admin:shanghai"
    path = tmp_path / "local-credentials.json"
    path.write_text(
        json.dumps(
            {
                "portal": "http://portal.test",
                "national_admin_token": "tok-national",
                "cities": {"shanghai": {"admin_token": CITY_TOKEN}},
                "datacenters": {
                    "lingang-com-01": {
                        "gateway_url": "http://gateway.test",
                        "agent_token": "agent",
                        "key_id": "k",
                        "secret": "s",
                    }
                },
                "demo_vouchers": {},
            }
        )
    )
    return path


@pytest.fixture
def run(credentials, session):
    def invoke(*args: str):
        runner = CliRunner()
        return runner.invoke(cli.cli, ["--credentials", str(credentials), *args])

    return invoke


SUMMARY = {
    "cities": 3,
    "live_cities": 2,
    "datacenters": 2,
    "budget_fen": 120_000_000_00,
    "committed_fen": 5_000_000_00,
    "redeemed_fen": 1_000_000_00,
    "gpu_seconds": 7_200,
    "utilisation": 0.25,
    "regions": {"east": {"gpu_seconds": 3600, "utilisation": 0.5}},
}


def test_summary_prints_a_table_anonymously(run, rpc, session):
    rpc.replies[("city_registry", "network_summary")] = SUMMARY

    result = run("summary")

    assert result.exit_code == 0, result.output
    assert "live" in result.output and "east" in result.output
    assert "50.0 %" in result.output
    assert "Authorization" not in session.requests[0][2]


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_flag_prints_the_portals_json(run, rpc, where):
    rpc.replies[("city_registry", "network_summary")] = SUMMARY

    args = ["--json", "summary"] if where == "before" else ["summary", "--json"]
    result = run(*args)

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["gpu_seconds"] == 7_200


def test_city_admit_uses_the_national_token_and_shows_credentials(run, rpc, session):
    rpc.replies[("city_registry", "admit_city")] = {
        "city": {"code": "ningbo", "name": "Ningbo"},
        "admin_token": "tok-new",
        "amqp": {"username": "city_ningbo", "password": "pw"},
    }

    result = run("city", "admit", "ningbo", "Ningbo")

    assert result.exit_code == 0, result.output
    assert "tok-new" in result.output and "city_ningbo" in result.output
    assert rpc.called("city_registry", "admit_city") == [(("ningbo", "Ningbo"), {})]
    assert session.requests[-1][2]["Authorization"] == "Bearer tok-national"


def test_an_error_is_one_line_with_status_and_code(run, rpc):
    result = run("--token", "tok-unknown", "city", "admit", "ningbo", "Ningbo")

    assert result.exit_code == 1
    assert result.output.startswith("error: HTTP 401 ")
    assert len(result.output.strip().splitlines()) == 1


def test_forbidden_is_reported_with_the_portals_message(run, rpc, tmp_path):
    rpc.roles["tok-company"] = "datacenter:dc-1"
    application = tmp_path / "application.json"
    application.write_text(json.dumps({"program_id": "p"}))

    result = run("--token", "tok-company", "apply", "shanghai", str(application))

    assert result.exit_code == 1
    assert result.output.startswith("error: HTTP 403 forbidden: ")
    assert "shanghai" in result.output


def test_apply_uses_the_citys_token_and_shows_the_reasons(
    run, rpc, session, tmp_path, application_factory, city_factory, voucher_factory
):
    rpc.replies[("city_registry", "get_city")] = city_factory()
    rpc.replies[("city_registry", "list_cities")] = [city_factory()]
    voucher = voucher_factory()
    rpc.replies[("vouchers_shanghai", "apply")] = {
        "application_id": "a-1",
        "decision": "approved",
        "reasons": [{"rule": "employees", "passed": True, "evidence": {"n": 42}}],
        "rules_version": "v1",
        "voucher": voucher,
    }
    rpc.replies[("city_registry", "issue_company_token")] = {
        "token": "first-company-token",
        "id": "tok_0000000000000001",
    }
    application = tmp_path / "application.json"
    application.write_text(json.dumps(application_factory()))

    result = run("apply", "shanghai", str(application))

    assert result.exit_code == 0, result.output
    assert "approved" in result.output and voucher["code"] in result.output
    # the company's first token, shown this once: the staff hand it over
    assert "first-company-token" in result.output
    assert session.requests[-1][2]["Authorization"] == f"Bearer {CITY_TOKEN}"


def test_apply_reports_an_unreadable_file(run, tmp_path):
    application = tmp_path / "application.json"
    application.write_text("{not json")

    result = run("apply", "shanghai", str(application))

    assert result.exit_code == 1
    assert result.output.startswith("error: cannot read ")


def test_voucher_show_lists_every_redemption(run, rpc, voucher_factory):
    voucher = voucher_factory(
        redemptions=[
            {
                "record_id": "r-1",
                "datacenter_id": "lingang-com-01",
                "gpu_seconds": 36_000,
                "cost_fen": 32_000,
                "subsidy_fen": 25_600,
            }
        ]
    )
    rpc.replies[("city_registry", "voucher_prefixes")] = {"SH": "shanghai"}
    rpc.replies[("vouchers_shanghai", "get_voucher")] = voucher

    table = run("voucher", "show", voucher["code"])
    machine = run("voucher", "show", voucher["code"], "--json")

    assert table.exit_code == 0, table.output
    assert "r-1" in table.output and "10.0" in table.output
    assert json.loads(machine.output)["redemptions"][0]["record_id"] == "r-1"


def test_voucher_show_with_a_mistyped_code_is_a_400(run):
    result = run("voucher", "show", "SH-NOTACODE")

    assert result.exit_code == 1
    assert result.output.startswith("error: HTTP 400 invalid_voucher_code: ")


def test_datacenter_register_posts_each_entry_of_a_list_file(run, rpc, tmp_path):
    registered = []

    def register(registration):
        registered.append(registration["id"])
        return {
            "datacenter": {"id": registration["id"]},
            "key_id": f"key-{registration['id']}",
            "secret": "s3cret",
            "amqp": {"username": f"dc_{registration['id']}", "password": "pw"},
            "token": "tok-dc",
        }

    rpc.replies[("city_registry", "register_datacenter")] = register
    entry = {
        "name": "Test DC",
        "operator": "Op",
        "city": "shanghai",
        "hub_region": "east",
        "government_run": False,
        "inventory": [
            {
                "gpu_model": "H100",
                "count": 8,
                "chip_origin": "imported",
                "price_fen_per_gpu_hour": 3000,
            }
        ],
    }
    file = tmp_path / "dcs.yaml"
    file.write_text(
        json.dumps({"datacenters": [entry | {"id": "dc-a"}, entry | {"id": "dc-b"}]})
    )

    result = run("--json", "datacenter", "register", str(file))

    assert result.exit_code == 0, result.output
    assert registered == ["dc-a", "dc-b"]
    assert [d["key_id"] for d in json.loads(result.output)] == ["key-dc-a", "key-dc-b"]


def test_reconcile_exits_1_when_there_is_drift(run, rpc):
    rpc.replies[("city_registry", "reconcile")] = {
        "as_of": "2025-03-01T08:00:00Z",
        "ok": False,
        "cities": {"shanghai": {"checked": True}, "chengdu": {"checked": False}},
        "drift": [
            {
                "city": "shanghai",
                "program_id": "p",
                "field": "committed_fen",
                "registry": 10,
                "ledger": 12,
                "difference": 2,
            }
        ],
    }

    result = run("reconcile")

    assert result.exit_code == 1
    assert "committed_fen" in result.output and "chengdu" in result.output


def test_reconcile_without_drift_exits_0(run, rpc):
    rpc.replies[("city_registry", "reconcile")] = {
        "as_of": "2025-03-01T08:00:00Z",
        "ok": True,
        "cities": {},
        "drift": [],
    }

    result = run("reconcile", "--json")

    assert result.exit_code == 0
    assert json.loads(result.output)["ok"] is True


def test_an_unreachable_portal_is_one_line(credentials, monkeypatch):
    class Down:
        def request(self, *args, **kwargs):
            raise requests.ConnectionError("connection refused")

    monkeypatch.setattr(cli, "make_session", Down)

    result = CliRunner().invoke(cli.cli, ["--credentials", str(credentials), "summary"])

    assert result.exit_code == 1
    assert result.output.startswith("error: cannot reach the portal at http://portal")


def test_rules_check_matches_the_rules_module(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not a mapping\n")
    files = ["deploy/cities/shanghai.yaml", str(bad)]

    expected_status = rules.main(["check", *files])
    expected = capsys.readouterr()
    result = CliRunner().invoke(cli.cli, ["rules", "check", *files])

    assert expected_status == 1
    assert result.exit_code == expected_status
    assert result.stdout == expected.out
    assert result.stderr == expected.err


def test_simulate_sends_count_jobs_to_the_gateway(credentials, monkeypatch):
    sent = []

    class Gateway:
        headers: dict = {}

        def request(self, method, url, json=None, timeout=None, **kwargs):
            response = requests.Response()
            response.status_code = 200
            body: dict = {}
            if url.endswith("/v1/status"):
                body = {"inventory": [{"gpu_model": "H100", "count": 8}]}
            elif url.endswith("/v1/usage"):
                sent.extend(json)
                response.status_code = 202
                body = {"accepted": len(json), "duplicates": 0}
            response._content = __import__("json").dumps(body).encode()
            return response

    monkeypatch.setattr(cli, "make_session", Gateway)
    monkeypatch.setattr(cli.time, "sleep", lambda _s: None)

    result = CliRunner().invoke(
        cli.cli,
        [
            "--credentials",
            str(credentials),
            "--json",
            "simulate",
            "--datacenter",
            "lingang-com-01",
            "--rate",
            "120",
            "--count",
            "13",
            "--seed",
            "7",
        ],
    )

    assert result.exit_code == 0, result.output
    assert len(sent) == 13
    assert {r["gpu_model"] for r in sent} == {"H100"}
    assert json.loads(result.stdout)["accepted"] == 13


def test_simulate_names_an_unknown_datacenter(credentials):
    result = CliRunner().invoke(
        cli.cli,
        ["--credentials", str(credentials), "simulate", "--datacenter", "nowhere"],
    )

    assert result.exit_code == 1
    assert "no gateway for data centre 'nowhere'" in result.output


PARKED = {
    "id": 3,
    "routing_key": "shanghai.program_published",
    "event_id": "sh-poison",
    "kind": "failed",
    "reason": "DataError: integer out of range",
    "attempts": 5,
    "parked_at": "2026-12-07T08:00:00Z",
    "replayed_at": None,
    "outcome": None,
}


def test_parked_list_shows_each_reason(run, rpc):
    rpc.replies[("city_registry", "list_parked_events")] = lambda **kw: {
        "items": [PARKED] if kw.get("kind") in (None, "failed") else [],
        "total": 1 if kw.get("kind") in (None, "failed") else 0,
    }

    shown = run("parked", "list")
    only_rejected = run("parked", "list", "--kind", "rejected", "--json")

    assert shown.exit_code == 0, shown.output
    assert "parked events of registry (1)" in shown.output
    assert "DataError" in shown.output
    assert json.loads(only_rejected.output)["items"] == []


def test_parked_replay_exits_1_while_it_still_fails(run, rpc):
    outcomes = iter(["parked_again", "applied"])
    rpc.replies[("city_registry", "replay_parked_event")] = lambda parked_id: {
        "id": parked_id,
        "outcome": next(outcomes),
        "reason": None,
    }

    failing = run("parked", "replay", "3")
    applied = run("parked", "replay", "3")

    assert failing.exit_code == 1 and "parked_again" in failing.output
    assert applied.exit_code == 0 and "applied" in applied.output


def test_parked_service_selects_whose(run, rpc):
    rpc.replies[("metering", "list_parked_events")] = lambda **kw: {
        "items": [PARKED],
        "total": 1,
    }
    rpc.replies[("metering", "replay_parked_event")] = lambda parked_id: {
        "id": parked_id,
        "outcome": "applied",
        "reason": None,
    }

    shown = run("parked", "list", "--service", "metering")
    applied = run("parked", "replay", "3", "--service", "metering")

    assert shown.exit_code == 0 and "parked events of metering (1)" in shown.output
    assert applied.exit_code == 0 and "of metering: applied" in applied.output
    assert rpc.called("metering", "replay_parked_event") == [((3,), {})]
