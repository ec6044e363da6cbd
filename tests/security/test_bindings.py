"""A voucher's bindings are its holder's consent (DESIGN.md §9, CONTRACTS.md §7):
``GET /api/v1/vouchers/<code>/bindings`` is for its company, its city's staff
and the ministry; ``PUT``/``DELETE`` of a tenant for its company alone. Each
refusal beside the caller who must still succeed; a refused caller never
reaches ``authorise_binding`` or ``withdraw_binding``.
"""

from __future__ import annotations

import pytest

from tests.security.conftest import HOLDER, OTHER_COMPANY

DC, TENANT = "guian-gov-01", "team-a"


@pytest.fixture
def bindings(rpc, network):
    binding = {
        "voucher_code": network["code"],
        "datacenter_id": DC,
        "tenant_id": TENANT,
        "status": "authorised",
        "requested_at": None,
        "authorised_at": "2026-12-07T08:00:00Z",
        "withdrawn_at": None,
        "updated_at": "2026-12-07T08:00:00Z",
    }
    rpc.replies[("vouchers_shanghai", "list_bindings")] = lambda code: {
        "voucher": network["voucher"],
        "items": [binding],
    }
    rpc.replies[("city_registry", "get_datacenter")] = lambda dc: {"datacenter_id": dc}
    for method, status in (
        ("authorise_binding", "authorised"),
        ("withdraw_binding", "withdrawn"),
    ):
        rpc.replies[("vouchers_shanghai", method)] = (
            lambda code, dc, tenant, actor, status=status: binding | {"status": status}
        )
    return network


def _decisions(rpc) -> list:
    return rpc.called("vouchers_shanghai", "authorise_binding") + rpc.called(
        "vouchers_shanghai", "withdraw_binding"
    )


@pytest.mark.parametrize(
    "role", ["national_admin", "city_admin:shanghai", f"company:{HOLDER}"]
)
def test_holder_its_city_and_national_read_the_bindings(
    client, bindings, token_for, role
):
    response = client.get(
        f"/api/v1/vouchers/{bindings['code']}/bindings", headers=token_for(role)
    )

    assert response.status_code == 200
    body = response.get_json()
    assert body["voucher_code"] == bindings["code"]
    assert [(b["datacenter_id"], b["tenant_id"]) for b in body["items"]] == [
        (DC, TENANT)
    ]


@pytest.mark.parametrize(
    "role, status",
    [
        (None, 401),
        ("city_admin:chengdu", 403),  # another city: by the code's prefix alone
        (f"company:{OTHER_COMPANY}", 404),  # another company: not even existence
        (f"datacenter:{DC}", 403),  # the data centre asks; it never reads consent
    ],
)
def test_others_do_not_read_the_bindings(client, bindings, token_for, role, status):
    headers = token_for(role) if role else {}

    response = client.get(
        f"/api/v1/vouchers/{bindings['code']}/bindings", headers=headers
    )

    assert response.status_code == status


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_the_holder_decides(client, rpc, bindings, token_for, method):
    response = client.open(
        f"/api/v1/vouchers/{bindings['code']}/bindings/{DC}/{TENANT}",
        method=method,
        headers=token_for(f"company:{HOLDER}"),
    )

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == (
        "authorised" if method == "PUT" else "withdrawn"
    )
    (call,) = _decisions(rpc)
    assert call[0][:3] == (bindings["code"], DC, TENANT)
    assert call[0][3] == f"company:{HOLDER}"  # the actor is the holder, as audited


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize(
    "role, status",
    [
        (None, 401),
        ("national_admin", 403),  # the ministry reads; the money is the company's
        ("city_admin:shanghai", 403),  # its own city: reads, never decides
        ("city_admin:chengdu", 403),
        (f"company:{OTHER_COMPANY}", 404),
        (f"datacenter:{DC}", 403),  # a data centre cannot consent for the holder
    ],
)
def test_nobody_else_decides(client, rpc, bindings, token_for, method, role, status):
    headers = token_for(role) if role else {}

    response = client.open(
        f"/api/v1/vouchers/{bindings['code']}/bindings/{DC}/{TENANT}",
        method=method,
        headers=headers,
    )

    assert response.status_code == status
    assert _decisions(rpc) == []


def test_a_data_centre_that_is_no_member_is_404(client, rpc, bindings, token_for):
    from services.common.errors import NotFound

    def unknown(dc):
        raise NotFound("datacenter_not_found", f"no data centre {dc}")

    rpc.replies[("city_registry", "get_datacenter")] = unknown

    response = client.put(
        f"/api/v1/vouchers/{bindings['code']}/bindings/nowhere-01/{TENANT}",
        headers=token_for(f"company:{HOLDER}"),
    )

    assert response.status_code == 404
    assert response.get_json()["error"] == "datacenter_not_found"
    assert _decisions(rpc) == []
