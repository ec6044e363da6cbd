"""TLS to the broker: one configuration (services/common/broker_tls.py)."""

import ssl
from pathlib import Path

import pytest

from services.common.broker_tls import broker_ssl, with_broker_ssl
from services.common.config import AMQP_SSL, AMQP_URI, ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parents[3] / "deploy" / "config"
PLAIN = "amqp://guest:guest@localhost:5672/"
TLS = "amqps://member:secret@broker.example:5671/"


@pytest.fixture
def ca(tmp_path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("not read here")
    return str(path)


def test_a_plain_uri_with_blank_options_is_plain():
    blank = {"ca_certs": "", "certfile": "", "keyfile": None}
    assert broker_ssl({AMQP_URI: PLAIN, AMQP_SSL: blank}) is None
    assert broker_ssl({AMQP_URI: PLAIN}) is None


def test_an_amqps_uri_verifies_the_broker_with_the_named_ca(ca):
    options = broker_ssl({AMQP_URI: TLS, AMQP_SSL: {"ca_certs": ca, "keyfile": ""}})
    assert options == {
        "ca_certs": ca,
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,  # kombu puts the URI's host here
    }
    # Idempotent: nameko is handed the result as AMQP_SSL, and our own
    # connections read it back from there.
    assert broker_ssl({AMQP_URI: TLS, AMQP_SSL: options}) == options


def test_an_amqps_uri_without_a_ca_verifies_against_the_system_store():
    assert broker_ssl({AMQP_URI: TLS}) == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,
    }


@pytest.mark.parametrize(
    ("uri", "options", "message"),
    [
        (PLAIN, {"ca_certs": "CA"}, "is not amqps://"),
        (TLS, {"ca_certs": "/nonexistent/ca.pem"}, "is not a file"),
        (TLS, {"cert_reqs": ssl.CERT_NONE}, "always verified"),
        (TLS, {"verify": False}, "unknown option"),
        (TLS, {"keyfile": "CA"}, "keyfile needs its certfile"),
        (TLS, "yes", "must be a mapping"),
    ],
)
def test_a_tls_setting_that_would_not_hold_is_refused(uri, options, message, ca):
    if isinstance(options, dict):
        options = {k: ca if v == "CA" else v for k, v in options.items()}
    with pytest.raises(ConfigError, match=message):
        broker_ssl({AMQP_URI: uri, AMQP_SSL: options})


@pytest.mark.parametrize(
    "name",
    ["city_registry", "metering", "vouchers", "datacenter_gateway", "gateway"],
)
def test_every_config_file_takes_tls_from_the_environment(name, ca):
    env = {"CITY_CODE": "shanghai", "DATACENTER_ID": "dc", "KEY_ID": "k"}
    env |= {"KEY_SECRET": "s"}
    plain = with_broker_ssl(load_config(CONFIG_DIR / f"{name}.yaml", env))
    assert plain[AMQP_SSL] is None
    env |= {"AMQP_URI": TLS, "AMQP_CA_FILE": ca}
    tls = with_broker_ssl(load_config(CONFIG_DIR / f"{name}.yaml", env))
    assert tls[AMQP_SSL]["ca_certs"] == ca
