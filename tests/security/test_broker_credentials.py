"""A member's broker password, rotated by the national admin only.

``POST /api/v1/cities/<city>/broker-credentials`` and
``…/datacenters/<id>/broker-credentials`` hand out a new password for the
member's broker user, once. A city admin asking for its own (or another
city's), a data centre, a company or anyone anonymous gets nothing, and the
registry is never asked.
"""

from __future__ import annotations

import pytest

from tests.security.conftest import OTHER_COMPANY

PATHS = [
    ("/api/v1/cities/shanghai/broker-credentials", ("city", "shanghai")),
    (
        "/api/v1/datacenters/guian-gov-01/broker-credentials",
        ("datacenter", "guian-gov-01"),
    ),
]
WRONG = [
    ("city_admin:shanghai", 403),
    ("city_admin:chengdu", 403),
    ("datacenter:guian-gov-01", 403),
    (f"company:{OTHER_COMPANY}", 403),
    (None, 401),
]


@pytest.mark.parametrize("path, member", PATHS)
def test_the_national_admin_gets_a_new_password_once(
    client, rpc, token_for, path, member
):
    rpc.replies[("city_registry", "grant_member_credentials")] = lambda kind, m: {
        "username": f"{kind}.{m}",
        "password": "s3cret",
    }
    answer = client.post(path, headers=token_for("national_admin"))
    assert answer.status_code == 201
    assert answer.get_json() == {
        "username": f"{member[0]}.{member[1]}",
        "password": "s3cret",
    }
    assert rpc.called("city_registry", "grant_member_credentials") == [(member, {})]


@pytest.mark.parametrize("path, member", PATHS)
@pytest.mark.parametrize("role, status", WRONG)
def test_nobody_else_gets_one(client, rpc, token_for, path, member, role, status):
    headers = token_for(role) if role else {}
    answer = client.post(path, headers=headers)
    assert answer.status_code == status
    assert answer.get_json()["error"] in ("unauthorized", "forbidden")
    assert rpc.called("city_registry", "grant_member_credentials") == []
