"""Portal tokens listed and revoked one by one (``/api/v1/tokens``).

A listing shows ids, never secrets; the national admin sees and revokes any
token, every other principal only its own role's. The portal narrows the
registry's call to the caller's role, and the registry answers
``token_not_found`` for a token outside it, so a principal cannot even learn
that another's token id exists. Each refusal beside the legitimate use.
"""

from __future__ import annotations

import pytest

from services.common.errors import NotFound
from tests.security.conftest import HOLDER, OTHER_COMPANY

SHANGHAI = "city_admin:shanghai"
COMPANY = f"company:{HOLDER}"


@pytest.fixture
def registry(rpc, token_for):
    """A fake registry's tokens: ``{id: (headers, role)}``; list and revoke
    behave as ``city_registry`` does, the role narrowing included."""
    held = {}
    for n, role in enumerate([SHANGHAI, SHANGHAI, "city_admin:beijing", COMPANY]):
        held[f"tok_{n:016x}"] = (token_for(role), role)

    def view(token_id):
        return {
            "id": token_id,
            "role": held[token_id][1],
            "status": "active",
            "created_at": "2026-03-01T08:00:00Z",
            "expires_at": "2026-05-30T08:00:00Z",
            "revoked_at": None,
            "last_used_at": None,
        }

    def list_tokens(role=None, limit=100, offset=0):
        items = [view(i) for i, (_, r) in held.items() if role in (None, r)]
        return {"items": items[offset : offset + limit], "total": len(items)}

    def revoke_token(token_id, role=None):
        if token_id not in held or role not in (None, held[token_id][1]):
            raise NotFound("token_not_found", "no such token")
        headers, _ = held[token_id]
        rpc.roles.pop(headers["Authorization"].split()[1], None)
        return view(token_id) | {"status": "revoked"}

    rpc.replies[("city_registry", "list_tokens")] = list_tokens
    rpc.replies[("city_registry", "revoke_token")] = revoke_token
    return held


def _listed(rpc) -> list:
    return rpc.called("city_registry", "list_tokens")


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "unauthorized"), ({"Authorization": "Bearer made-up"}, "invalid_token")],
)
def test_anonymous_lists_and_revokes_nothing(client, rpc, registry, headers, code):
    listed = client.get("/api/v1/tokens", headers=headers)
    revoked = client.delete("/api/v1/tokens/tok_0000000000000000", headers=headers)

    for response in (listed, revoked):
        assert response.status_code == 401
        assert response.get_json()["error"] == code
    assert _listed(rpc) == []
    assert rpc.called("city_registry", "revoke_token") == []


def test_national_admin_lists_all_or_one_role(client, rpc, registry, token_for):
    headers = token_for("national_admin")

    everything = client.get("/api/v1/tokens", headers=headers).get_json()
    shanghai = client.get(f"/api/v1/tokens?role={SHANGHAI}", headers=headers)

    assert everything["total"] == 4
    assert {item["role"] for item in shanghai.get_json()["items"]} == {SHANGHAI}
    assert [k["role"] for _, k in _listed(rpc)] == [None, SHANGHAI]


@pytest.mark.parametrize("role", [SHANGHAI, COMPANY, "datacenter:dc-1"])
def test_a_principal_lists_only_its_own_role(client, rpc, registry, token_for, role):
    response = client.get("/api/v1/tokens", headers=token_for(role))

    assert response.status_code == 200
    assert {item["role"] for item in response.get_json()["items"]} <= {role}
    assert [k["role"] for _, k in _listed(rpc)] == [role]


@pytest.mark.parametrize(
    ("role", "asked"),
    [
        (SHANGHAI, "city_admin:beijing"),
        (SHANGHAI, "national_admin"),
        (COMPANY, f"company:{OTHER_COMPANY}"),
        (COMPANY, SHANGHAI),
    ],
)
def test_a_principal_may_not_list_another_role(
    client, rpc, registry, token_for, role, asked
):
    response = client.get(f"/api/v1/tokens?role={asked}", headers=token_for(role))

    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"
    assert _listed(rpc) == []


def test_tokens_listing_comes_as_csv_too(client, registry, token_for):
    response = client.get(
        "/api/v1/tokens?format=csv", headers=token_for("national_admin")
    )

    assert response.status_code == 200
    assert response.text.splitlines()[0].startswith("id,role,status,created_at")


@pytest.mark.parametrize("role", ["city_admin:beijing", COMPANY, "datacenter:dc-1"])
def test_another_principal_cannot_revoke_a_token(
    client, rpc, registry, token_for, role
):
    shanghai_headers, _ = registry["tok_0000000000000000"]

    response = client.delete(
        "/api/v1/tokens/tok_0000000000000000", headers=token_for(role)
    )

    assert response.status_code == 404
    assert response.get_json()["error"] == "token_not_found"
    ((args, kwargs),) = rpc.called("city_registry", "revoke_token")
    assert kwargs == {"role": role}  # narrowed by the portal, checked there
    assert client.get("/api/v1/tokens", headers=shanghai_headers).status_code == 200


def test_a_principal_revokes_its_own_and_it_stops_at_once(client, registry):
    own, _ = registry["tok_0000000000000000"]
    colleague, _ = registry["tok_0000000000000001"]
    assert client.get("/api/v1/tokens", headers=colleague).status_code == 200

    response = client.delete("/api/v1/tokens/tok_0000000000000001", headers=own)

    assert response.status_code == 200
    assert response.get_json()["status"] == "revoked"
    # The portal's cache of roles is dropped: no 30 s of grace here.
    assert client.get("/api/v1/tokens", headers=colleague).status_code == 401
    assert client.get("/api/v1/tokens", headers=own).status_code == 200


def test_national_admin_revokes_any_token(client, rpc, registry, token_for):
    response = client.delete(
        "/api/v1/tokens/tok_0000000000000003", headers=token_for("national_admin")
    )

    assert response.status_code == 200
    assert response.get_json()["role"] == COMPANY
    ((_, kwargs),) = rpc.called("city_registry", "revoke_token")
    assert kwargs == {"role": None}
