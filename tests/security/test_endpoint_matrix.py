"""Principal × endpoint, generated from the one table (``gateway/access.py``).

Every route of the portal is called by every kind of principal: anonymous,
the national admin, the path's own city's staff and another city's, the
voucher's holder and another company (a company is one identity in every
city), the path's data centre and another. A principal the table does not
grant is refused (401 without a token, 403 or 404 with one) before anything
but a read reaches the services; one it grants gets past the checks (what it
then sees is each feature's own tests'). A route missing from the table fails
the first test, so a new endpoint cannot be forgotten.
"""

from __future__ import annotations

import pytest

from gateway import access
from gateway.access import (
    ANY_CITY_ADMIN,
    ANY_COMPANY,
    ANY_DATACENTER,
    ANY_ROLE,
    ANYONE,
    NATIONAL_ADMIN,
    OWN_CITY_ADMIN,
    OWN_COMPANY,
    OWN_DATACENTER,
)
from services.common import vouchercode
from services.common.errors import NotFound
from tests.security.conftest import HOLDER, OTHER_COMPANY

CODE = vouchercode.generate("SH")  # held by HOLDER, its only voucher (shanghai)
PATH_VALUES = {
    "credit_code": HOLDER,
    "city": "shanghai",
    "datacenter_id": "guian-gov-01",
    "code": CODE,
    "application_id": "1",
    "key_id": "k1",
    "token_id": "tok_0123456789abcdef",
    "dead_letter_id": "1",
    "refusal_id": "1",
    "record_id": "rec-1",
    "parked_id": "1",
    "month": "2026-03",
}
# role (None: anonymous) → the grants it holds on the paths above
PRINCIPALS: dict[str | None, set[str]] = {
    None: set(),
    "national_admin": {NATIONAL_ADMIN},
    "city_admin:shanghai": {OWN_CITY_ADMIN, ANY_CITY_ADMIN},
    "city_admin:chengdu": {ANY_CITY_ADMIN},
    f"company:{HOLDER}": {OWN_COMPANY, ANY_COMPANY},
    f"company:{OTHER_COMPANY}": {ANY_COMPANY},
    "datacenter:guian-gov-01": {OWN_DATACENTER, ANY_DATACENTER},
    "datacenter:lingang-com-01": {ANY_DATACENTER},
}
# What a refused caller may still cause: the portal's own look-ups.
READS = {
    "authenticate",
    "list_cities",
    "voucher_prefixes",
    "public_view",
    "get_voucher",
    # whether the path's company holds a voucher in the caller's city
    "list_vouchers",
    # a voucher's page, read before its holder is compared with the caller
    "voucher_statement",
    "list_redemptions",
    "list_bindings",
    "monthly_statement",
}


def _routes(app) -> set[tuple[str, str]]:
    return {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith(("/api/", "/healthz"))
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }


def _url(rule: str) -> str:
    url = access.openapi_path(rule)
    for name, value in PATH_VALUES.items():
        url = url.replace("{" + name + "}", value)
    return url


def test_every_route_is_in_the_table_and_the_table_has_no_other(app):
    assert _routes(app) == set(access.ENDPOINT_ACCESS)


def _granted(role: str | None, grants: frozenset[str]) -> bool:
    if ANYONE in grants:
        return True
    if role is None:
        return False
    return ANY_ROLE in grants or bool(PRINCIPALS[role] & grants)


def monthly_statement(code, month, company_id=None):
    """The city's answer: its holder's statement, or 404 for another company
    (as services/vouchers/ledger/statements.py answers)."""
    if company_id not in (None, HOLDER):
        raise NotFound("voucher_not_found", f"no voucher {code}")
    return {
        "voucher_code": code,
        "month": month,
        "company_id": HOLDER,
        "jobs": [],
        "clawbacks": [],
        "releases": [],
        "totals": {},
    }


@pytest.fixture
def network(rpc):
    rpc.replies[("city_registry", "list_cities")] = [
        {"code": "shanghai", "status": "live", "voucher_prefix": "SH"},
        {"code": "chengdu", "status": "live", "voucher_prefix": "CD"},
    ]
    rpc.replies[("city_registry", "voucher_prefixes")] = {
        "SH": "shanghai",
        "CD": "chengdu",
    }
    voucher = {
        "code": CODE,
        "city": "shanghai",
        "company_id": HOLDER,
        "program_id": "sh-compute-2025",
        "status": "active",
    }
    rpc.replies[("vouchers_shanghai", "get_voucher")] = voucher
    for method in ("voucher_statement", "list_redemptions", "list_bindings"):
        rpc.replies[("vouchers_shanghai", method)] = lambda *a, **k: {
            "voucher": voucher,
            "entries": [],
            "items": [],
            "total": 0,
        }
    rpc.replies[("vouchers_shanghai", "monthly_statement")] = monthly_statement
    for city, total in (("shanghai", 1), ("chengdu", 0)):
        rpc.replies[(f"vouchers_{city}", "list_vouchers")] = lambda total=total, **_: {
            "items": [],
            "total": total,
        }
    return rpc


@pytest.mark.parametrize(
    "method, rule",
    sorted(access.ENDPOINT_ACCESS),
    ids=lambda value: value,
)
def test_each_principal_gets_exactly_what_the_table_grants(
    method, rule, client, network, token_for
):
    grants = access.ENDPOINT_ACCESS[(method, rule)]
    wrong = []
    for role in PRINCIPALS:
        network.calls.clear()
        headers = token_for(role) if role else {}
        body = {} if method in ("POST", "PUT") else None
        try:
            answer = client.open(_url(rule), method=method, headers=headers, json=body)
            status = answer.status_code
        except Exception:  # noqa: BLE001 - past the checks, on the fake's answers
            status = 500
        writes = [m for s, m, _, _ in network.calls if m not in READS]
        if _granted(role, grants):
            if status in (401, 403):
                wrong.append((role, f"refused {status}"))
        else:
            expected = (401,) if role is None else (403, 404)
            if status not in expected:
                wrong.append((role, f"answered {status}"))
            if writes:
                wrong.append((role, f"reached {writes}"))
    assert wrong == []
