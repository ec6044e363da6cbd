"""The one table of who may call which RPC method, held to the services' code.

A method added to a service and forgotten in the table is refused to
everyone; a method in the table that no service serves is a stale grant.
Both fail here, as does a method served by nameko's own ``@rpc`` (which
would ask nobody who calls).
"""

from __future__ import annotations

from pathlib import Path

import nameko.rpc
import pytest
from nameko.extensions import ENTRYPOINT_EXTENSIONS_ATTR

from services.city_registry.service import CityRegistryService
from services.common import principals, rpc_access
from services.common.config import CITY_CODE, RULES_FILE
from services.common.principals import (
    CITY,
    DATA_VENDOR,
    DATACENTER,
    NATIONAL,
    RPC_CALLERS,
    Principal,
    may_call,
    national_users,
    principal_of,
    service_kind,
    uri_as,
    username_of,
)
from services.metering.service import MeteringService
from services.vouchers.service import build

SHANGHAI = Path(__file__).resolve().parents[3] / "deploy" / "cities" / "shanghai.yaml"


def _services() -> list[type]:
    vouchers = build({CITY_CODE: "shanghai", RULES_FILE: str(SHANGHAI)})
    return [CityRegistryService, MeteringService, vouchers]


def _rpc_entrypoints(cls: type) -> dict[str, list]:
    found = {}
    for name in dir(cls):
        extensions = getattr(getattr(cls, name), ENTRYPOINT_EXTENSIONS_ATTR, ())
        rpcs = [e for e in extensions if isinstance(e, nameko.rpc.Rpc)]
        if rpcs:
            found[name] = rpcs
    return found


@pytest.mark.parametrize("cls", _services(), ids=lambda cls: cls.name)
def test_the_table_lists_exactly_the_methods_each_service_serves(cls):
    served = set(_rpc_entrypoints(cls))
    assert served == set(RPC_CALLERS[service_kind(cls.name)])


@pytest.mark.parametrize("cls", _services(), ids=lambda cls: cls.name)
def test_every_rpc_method_is_served_through_the_caller_check(cls):
    unchecked = [
        name
        for name, entrypoints in _rpc_entrypoints(cls).items()
        if any(type(e) is not rpc_access.Rpc for e in entrypoints)
    ]
    assert unchecked == []


def test_every_method_names_only_known_kinds_of_caller():
    kinds = {NATIONAL, CITY, DATACENTER, DATA_VENDOR}
    assert {
        k for methods in RPC_CALLERS.values() for ks in methods.values() for k in ks
    } <= kinds


@pytest.mark.parametrize(
    "username, expected",
    [
        ("guest", Principal(NATIONAL)),
        ("national.portal", Principal(NATIONAL)),
        ("city.shanghai", Principal(CITY, "shanghai")),
        ("dc.guian-gov-01", Principal(DATACENTER, "guian-gov-01")),
        ("vendor.sh-data-exchange", Principal(DATA_VENDOR, "sh-data-exchange")),
        ("city.", None),
        ("city.shang hai!", None),
        ("mallory", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_a_broker_user_stands_for_one_principal(username, expected):
    assert principal_of(username, national_users()) == expected


def test_the_bootstrap_users_are_configurable():
    assert national_users("admin, ops") == frozenset({"admin", "ops"})
    assert national_users(["admin"]) == frozenset({"admin"})
    assert principal_of("guest", national_users("admin")) is None
    assert principal_of("admin", national_users("admin")) == Principal(NATIONAL)


def test_the_user_of_an_amqp_uri():
    assert username_of("amqp://city.x:pw@host:5672/") == "city.x"
    assert username_of("amqp://host/") == "guest"
    assert username_of("amqps://dc.a%2Db:pw@host/") == "dc.a-b"


def test_a_uri_as_another_user_keeps_the_rest():
    uri = "amqps://guest:guest@broker:5671/computenet?ssl=1"
    assert uri_as(uri, "city.x", "p@ss/w") == (
        "amqps://city.x:p%40ss%2Fw@broker:5671/computenet?ssl=1"
    )
    assert username_of(uri_as(uri, "city.x", "p")) == "city.x"
    assert uri_as("amqp://localhost/", "dc.a", "p") == "amqp://dc.a:p@localhost/"


@pytest.mark.parametrize("service", ["city_registry", "metering", "vouchers_shanghai"])
def test_members_may_call_nothing_and_the_national_side_everything(service):
    for method in RPC_CALLERS[service_kind(service)]:
        assert may_call(service, method, Principal(NATIONAL))
        for member in (
            Principal(CITY, "shanghai"),
            Principal(DATACENTER, "guian-gov-01"),
            Principal(DATA_VENDOR, "v"),
            None,
        ):
            assert not may_call(service, method, member)


def test_a_method_missing_from_the_table_is_refused_to_everyone():
    assert not may_call("city_registry", "drop_everything", Principal(NATIONAL))
    assert not may_call("unknown_service", "list_cities", Principal(NATIONAL))


def test_the_module_is_pure():
    source = Path(principals.__file__).read_text()
    assert "import nameko" not in source and "from nameko" not in source
