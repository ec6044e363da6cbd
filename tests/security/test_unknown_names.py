"""Made-up cities and voucher codes: 404 from memory, never a call routed to
a service that does not exist (which waits for the RPC timeout and is 503),
and never an RPC per made-up name (gateway/directory.py).

A city code and a voucher prefix become the name of an RPC service
(``vouchers_<city>``): the portal checks them against its snapshot of the
registry's list first. Each attack beside the same request for a real city.
"""

from __future__ import annotations

import pytest

from services.common import vouchercode


def _routed_to_cities(rpc) -> list:
    return [c for c in rpc.calls if c[0].startswith("vouchers_")]


def _registry_lists(rpc) -> int:
    return len(rpc.called("city_registry", "list_cities")) + len(
        rpc.called("city_registry", "voucher_prefixes")
    )


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/cities/{city}/vouchers",
        "/api/v1/cities/{city}/applications",
    ],
)
def test_an_unknown_city_is_404_and_never_called(client, rpc, network, token_for, path):
    headers = token_for("national_admin")

    response = client.get(path.format(city="atlantis"), headers=headers)

    assert response.status_code == 404
    assert response.get_json()["error"] == "city_not_found"
    assert _routed_to_cities(rpc) == []


def test_a_removed_city_is_404_and_never_called(client, rpc, network, token_for):
    response = client.get(
        "/api/v1/cities/oldtown/vouchers", headers=token_for("national_admin")
    )

    assert response.status_code == 404
    assert response.get_json()["error"] == "city_not_found"
    assert _routed_to_cities(rpc) == []


def test_a_real_city_is_still_served(client, rpc, network, token_for):
    response = client.get(
        "/api/v1/cities/shanghai/vouchers", headers=token_for("city_admin:shanghai")
    )

    assert response.status_code == 200
    assert len(rpc.called("vouchers_shanghai", "list_vouchers")) == 1


def test_made_up_city_pages_cost_the_registry_nothing_each(client, rpc, network):
    assert client.get("/api/v1/cities/shanghai").status_code == 200
    calls = len(rpc.calls)

    for n in range(200):
        response = client.get(f"/api/v1/cities/nowhere{n}")
        assert response.status_code == 404
        assert response.get_json()["error"] == "city_not_found"

    # At most one refresh of the list (MISS_REFRESH_S), no get_city per name.
    assert len(rpc.calls) - calls <= 1
    assert rpc.called("city_registry", "get_city") == []


def test_made_up_voucher_prefixes_cost_nothing_each(client, rpc, network, token_for):
    headers = token_for("national_admin")
    assert client.get(f"/api/v1/vouchers/{network['code']}", headers=headers)
    lists = _registry_lists(rpc)

    for prefix in ("ZZ", "QQ", "XYZ", "ABCD") * 25:
        response = client.get(
            f"/api/v1/vouchers/{vouchercode.generate(prefix)}", headers=headers
        )
        assert response.status_code == 404
        assert response.get_json()["error"] == "voucher_not_found"

    assert _registry_lists(rpc) - lists <= 1
    assert _routed_to_cities(rpc) == [
        ("vouchers_shanghai", "get_voucher", (network["code"],), {})
    ]


def test_a_malformed_voucher_code_is_400_by_its_check_character(
    client, rpc, network, token_for
):
    code = network["code"]
    mistyped = code[:-1] + ("A" if code[-1] != "A" else "B")

    for wrong in (mistyped, "SH-TOO-SHORT", "not a code"):
        response = client.get(
            f"/api/v1/vouchers/{wrong}", headers=token_for("national_admin")
        )
        assert response.status_code == 400
        assert response.get_json()["error"] == "invalid_voucher_code"
    assert _routed_to_cities(rpc) == []


def test_made_up_tokens_do_not_evict_a_signed_in_role(client, rpc, network, token_for):
    headers = token_for("national_admin")
    assert client.get("/api/v1/audit", headers=headers).status_code == 200
    for n in range(2000):
        made_up = {"Authorization": f"Bearer made-up-{n}"}
        assert client.get("/api/v1/audit", headers=made_up).status_code == 401
    asked = len(rpc.called("city_registry", "authenticate"))

    assert client.get("/api/v1/audit", headers=headers).status_code == 200
    assert len(rpc.called("city_registry", "authenticate")) == asked
