"""Roles as the registry spells them → :class:`gateway.auth.Role` and back.

A company is ``company:<credit code>``: one identity in every city, no city
in the role. A shape the portal does not know, the legacy
``company:<city>:<code>`` among them, is no role at all (its token is
refused as invalid), never a role with less checked.
"""

from __future__ import annotations

import pytest

from gateway.auth import Role
from tests.support.vouchers_data import credit_code

CODE = credit_code(1)


@pytest.mark.parametrize(
    "text, role",
    [
        ("national_admin", Role("national_admin")),
        ("city_admin:shanghai", Role("city_admin", city="shanghai")),
        (f"company:{CODE}", Role("company", company_id=CODE)),
        ("datacenter:dc-1", Role("datacenter", datacenter_id="dc-1")),
    ],
)
def test_each_role_parses_and_is_spelt_back_as_it_came(text, role):
    assert Role.parse(text) == role
    assert str(role) == text


@pytest.mark.parametrize(
    "text",
    [
        f"company:shanghai:{CODE}",  # the legacy shape, with a city
        "company:",
        "company:C1",
        f"company:{CODE[:17]}{'0' if CODE[17] != '0' else '1'}",  # check character
        f"company:{CODE.lower()}",  # not as the registry spells it
        f"company:{CODE} ",
        "city_admin",
        "root",
        "",
    ],
)
def test_unknown_or_malformed_roles_are_none(text):
    assert Role.parse(text) is None


def test_a_company_is_confined_to_itself_not_to_a_city():
    role = Role.parse(f"company:{CODE}")

    assert role.is_company() and role.is_company(CODE)
    assert not role.is_company(credit_code(2))
    assert role.city is None and role.scope is None
    assert not role.is_city_admin("shanghai")
    assert not Role.parse("city_admin:shanghai").is_company()
