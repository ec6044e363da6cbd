"""docker-compose.yml cannot be run here (no Docker engine), so it is checked:
every service it names exists, every module it runs imports, every config
file it points at exists, and every database it uses is created."""

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = {name: spec for name, spec in SERVICES.items() if "build" in spec}
INIT_SQL = (ROOT / "deploy" / "postgres" / "init.sql").read_text()


def test_topology_has_broker_database_every_service_and_the_portal():
    assert {"rabbitmq", "postgres", "city_registry", "metering", "portal"} <= set(
        SERVICES
    )
    cities = {n for n in SERVICES if n.startswith("vouchers_")}
    assert cities == {"vouchers_shanghai", "vouchers_chengdu", "vouchers_shandong"}
    assert len([n for n in SERVICES if n.startswith("datacenter_gateway_")]) == 2


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_each_command_runs_a_module_that_imports(name):
    argv = shlex.split(APP_SERVICES[name]["command"])
    if argv[0] == "gunicorn":
        module, _, factory = argv[-1].partition(":")
        app_module = importlib.import_module(module)
        assert callable(getattr(app_module, factory.removesuffix("()")))
        return
    assert argv[:2] == ["python", "-m"], argv
    module = argv[2]
    assert importlib.util.find_spec(f"{module}.__main__") is not None, module
    importlib.import_module(module)
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), config


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_each_service_depends_on_what_exists(name):
    for dependency in APP_SERVICES[name].get("depends_on", {}):
        assert dependency in SERVICES


@pytest.mark.parametrize(
    "name",
    sorted(n for n, s in APP_SERVICES.items() if "DATABASE_URL" in s["environment"]),
)
def test_each_database_is_its_own_and_is_created(name):
    url = APP_SERVICES[name]["environment"]["DATABASE_URL"]
    assert_created(url)
    others = [
        s["environment"]["DATABASE_URL"]
        for n, s in APP_SERVICES.items()
        if n != name and "DATABASE_URL" in s["environment"]
    ]
    assert url not in others


def assert_created(url):
    database = url.rsplit("/", 1)[1]
    assert re.search(rf"CREATE DATABASE {re.escape(database)};", INIT_SQL), database


def test_the_portal_audit_log_has_its_own_database():
    assert_created(SERVICES["portal"]["environment"]["AUDIT_DATABASE_URL"])


def test_city_services_have_a_rules_file():
    for name, spec in APP_SERVICES.items():
        if name.startswith("vouchers_"):
            city = spec["environment"]["CITY_CODE"]
            assert (ROOT / "deploy" / "cities" / f"{city}.yaml").is_file()


def test_dockerfile_copies_what_exists():
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_the_database_has_room_for_a_dozen_meterings_advisory_locks():
    """A metering batch holds an advisory lock per record and per corrected
    record until it commits; a lock table too small fails batches with "out
    of shared memory" (then retried one message at a time, slowly)."""
    argv = SERVICES["postgres"].get("command", ["postgres"])
    settings = dict(
        argv[n + 1].split("=", 1) for n, arg in enumerate(argv) if arg == "-c"
    )
    lock_table = int(settings.get("max_locks_per_transaction", 64)) * int(
        settings.get("max_connections", 100)
    )
    metering = yaml.safe_load((ROOT / "deploy/config/metering.yaml").read_text())

    def default(key: str) -> int:  # "${BATCH_SIZE:500}" -> 500
        return int(re.fullmatch(r"\$\{\w+:(\d+)\}", str(metering[key])).group(1))

    per_copy = 2 * default("BATCH_SIZE") * default("CONSUMERS")
    assert lock_table >= 12 * per_copy


def test_no_secret_has_a_placeholder_default():
    """A missing key or token stops compose (``${VAR:?…}``); a default such as
    ``unset`` would start a member with a secret everyone knows."""
    text = (ROOT / "docker-compose.yml").read_text()
    secret = r"\$\{([A-Z_]*(?:SECRET|TOKEN|KEY_ID|PASSWORD|_USER|TLS_DIR)[A-Z_]*)[:?}-]"
    for name in re.findall(secret, text):
        assert re.search(rf"\$\{{{name}:\?[^}}]+\}}", text), name
    assert "-unset}" not in text


def test_gateways_open_to_the_network_have_an_agent_token():
    for name, spec in APP_SERVICES.items():
        if name.startswith("datacenter_gateway_"):
            env = spec["environment"]
            assert env["HTTP_HOST"] == "0.0.0.0"  # reached from the agents' hosts
            assert re.fullmatch(r"\$\{[A-Z_]+_AGENT_TOKEN:\?.+\}", env["AGENT_TOKEN"])


def test_the_broker_publishes_no_port():
    assert "ports" not in SERVICES["rabbitmq"]
    for name, spec in APP_SERVICES.items():
        for port in spec.get("ports", []):
            assert not re.search(r"\b567[12]\b", str(port)), (name, port)


def _mounts(spec) -> dict[str, str]:
    """``{container path: host path}`` of a service's bind mounts."""
    mounts = {}
    for volume in spec.get("volumes", []):
        # The source may be a ${VAR:?message}, colons and all.
        found = re.fullmatch(r"((?:\$\{[^}]*\})?[^:]*):([^:]+)(?::\w+)?", volume)
        assert found, volume
        mounts[found.group(2)] = found.group(1)
    return mounts


def _broker_conf() -> dict[str, str]:
    mounts = _mounts(SERVICES["rabbitmq"])
    [source] = [s for t, s in mounts.items() if t.startswith("/etc/rabbitmq/conf.d/")]
    assert source.startswith("./deploy/"), source
    lines = (ROOT / source).read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if "=" in line and line[0] != "#")
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_broker_listens_for_amqp_over_tls_only():
    conf = _broker_conf()
    assert conf["listeners.tcp"] == "none"
    assert conf["listeners.ssl.default"] == "5671"
    assert conf["ssl_options.verify"] == "verify_peer"
    # The certificates come from the operator's directory, named in .env.
    mounts = _mounts(SERVICES["rabbitmq"])
    assert re.fullmatch(r"\$\{BROKER_TLS_DIR:\?.+\}", mounts["/etc/rabbitmq/tls"])
    for key in ("cacertfile", "certfile", "keyfile"):
        assert conf[f"ssl_options.{key}"].startswith("/etc/rabbitmq/tls/"), key


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_every_member_reaches_the_broker_over_tls_and_verifies_it(name):
    spec = APP_SERVICES[name]
    env = spec["environment"]
    assert env["AMQP_URI"].startswith("amqps://") and "guest" not in env["AMQP_URI"]
    source = _mounts(spec)[env["AMQP_CA_FILE"]]
    assert source.startswith("${BROKER_TLS_DIR:?") and source.endswith("/ca.pem")
    config = yaml.safe_load((ROOT / _config_of(spec)).read_text())
    assert config["AMQP_SSL"]["ca_certs"] == "${AMQP_CA_FILE:}"


def _config_of(spec) -> str:
    argv = shlex.split(spec["command"])
    if argv[0] == "gunicorn":
        return "deploy/config/gateway.yaml"
    return argv[argv.index("--config") + 1]


MEMBERS = {
    "vouchers_shanghai": "city.shanghai",
    "vouchers_chengdu": "city.chengdu",
    "vouchers_shandong": "city.shandong",
    "datacenter_gateway_guian": "dc.guian-gov-01",
    "datacenter_gateway_lingang": "dc.lingang-com-01",
}


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_each_member_runs_as_its_own_broker_user_and_the_rest_as_national(name):
    """DESIGN.md §8: a city or data centre never gets the bootstrap user; the
    national side is the bootstrap user, and every process knows it is."""
    env = APP_SERVICES[name]["environment"]
    user = re.match(r"amqps://(\$\{[^}]+\}|[^:]+):", env["AMQP_URI"]).group(1)
    national = "${BROKER_USER:?set BROKER_USER in .env}"
    assert env["NATIONAL_BROKER_USERS"] == national
    if name in MEMBERS:
        assert user == MEMBERS[name]
        assert re.search(r":\$\{[A-Z]+_BROKER_PASSWORD:\?.+\}@", env["AMQP_URI"])
    else:
        assert user == national
    config = yaml.safe_load((ROOT / _config_of(APP_SERVICES[name])).read_text())
    if name != "portal":  # the portal serves no RPC and publishes no usage
        assert config["NATIONAL_BROKER_USERS"] == "${NATIONAL_BROKER_USERS:guest}"
