"""Who may call each endpoint of ``/api/v1``: the one table.

Each view checks its caller in its own code (``gateway/auth.py``,
``gateway/vouchers.py``); this table says what those checks must amount to,
in words a city's IT department can read. The OpenAPI document carries it
(``x-roles`` on every operation), and ``tests/security/test_endpoint_matrix.py``
calls every endpoint as every kind of principal and holds the views to it;
a route missing from the table fails there, so a new endpoint cannot be
forgotten.

Grants, for the path's own city, voucher or data centre:

- ``anyone``: no token needed (public aggregates);
- ``national_admin``;
- ``own_city_admin``: the staff of the path's city (or of the voucher's city);
- ``own_company``: a company of the path's city (applying, its own vouchers
  listed), or the holder of the path's voucher;
- ``own_datacenter``: the path's data centre;
- ``any_city_admin``, ``any_datacenter``: each sees its own part of a
  national list (the audit log, dead letters);
- ``any_role``: any valid token, for what is its own (its tokens).
"""

from __future__ import annotations

ANYONE = "anyone"
NATIONAL_ADMIN = "national_admin"
OWN_CITY_ADMIN = "own_city_admin"
OWN_COMPANY = "own_company"
OWN_DATACENTER = "own_datacenter"
ANY_CITY_ADMIN = "any_city_admin"
ANY_DATACENTER = "any_datacenter"
ANY_ROLE = "any_role"

_PUBLIC = frozenset({ANYONE})
_NATIONAL = frozenset({NATIONAL_ADMIN})
_VOUCHER_READERS = frozenset({NATIONAL_ADMIN, OWN_CITY_ADMIN, OWN_COMPANY})
_CITY_STAFF = frozenset({NATIONAL_ADMIN, OWN_CITY_ADMIN})
_DATACENTER = frozenset({NATIONAL_ADMIN, OWN_DATACENTER})

# (method, Flask rule) → grants
ENDPOINT_ACCESS: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/healthz"): _PUBLIC,
    ("GET", "/api/v1/network/summary"): _PUBLIC,
    ("GET", "/api/v1/network/overview"): _PUBLIC,
    ("GET", "/api/v1/cities"): _PUBLIC,
    ("GET", "/api/v1/cities/<city>"): _PUBLIC,
    ("GET", "/api/v1/datacenters"): _PUBLIC,
    ("GET", "/api/v1/datacenters/<datacenter_id>"): _PUBLIC,
    # with voucher=: its holder, its city, national (test_voucher_recommendations)
    ("GET", "/api/v1/datacenters/recommendations"): _PUBLIC,
    ("GET", "/api/v1/openapi.json"): _PUBLIC,
    ("GET", "/api/v1/docs"): _PUBLIC,
    # a city's applications and vouchers
    ("POST", "/api/v1/cities/<city>/applications"): _VOUCHER_READERS,
    ("GET", "/api/v1/cities/<city>/applications"): _CITY_STAFF,
    ("POST", "/api/v1/cities/<city>/applications/<application_id>/review"): (
        _CITY_STAFF
    ),
    ("GET", "/api/v1/cities/<city>/vouchers"): _VOUCHER_READERS,
    ("GET", "/api/v1/vouchers/<code>"): _VOUCHER_READERS,
    ("GET", "/api/v1/vouchers/<code>/statement"): _VOUCHER_READERS,
    ("GET", "/api/v1/vouchers/<code>/redemptions"): _VOUCHER_READERS,
    ("POST", "/api/v1/vouchers/<code>/revoke"): _CITY_STAFF,
    # data centres
    ("GET", "/api/v1/datacenters/<datacenter_id>/usage/tenants"): _DATACENTER,
    ("GET", "/api/v1/datacenters/<datacenter_id>/usage/hourly"): _DATACENTER,
    ("GET", "/api/v1/datacenters/<datacenter_id>/keys"): _DATACENTER,
    ("POST", "/api/v1/datacenters/<datacenter_id>/keys"): _DATACENTER,
    ("DELETE", "/api/v1/datacenters/<datacenter_id>/keys/<key_id>"): _DATACENTER,
    ("GET", "/api/v1/dead-letters"): frozenset({NATIONAL_ADMIN, ANY_DATACENTER}),
    ("POST", "/api/v1/dead-letters/<int:dead_letter_id>/replay"): _NATIONAL,
    # membership and the national read model
    ("POST", "/api/v1/cities"): _NATIONAL,
    ("DELETE", "/api/v1/cities/<city>"): _NATIONAL,
    ("POST", "/api/v1/cities/<city>/broker-credentials"): _NATIONAL,
    ("POST", "/api/v1/datacenters"): _NATIONAL,
    ("DELETE", "/api/v1/datacenters/<datacenter_id>"): _NATIONAL,
    ("POST", "/api/v1/datacenters/<datacenter_id>/broker-credentials"): _NATIONAL,
    ("POST", "/api/v1/network/reconciliation"): _NATIONAL,
    ("POST", "/api/v1/network/reconciliation/rebuild"): _NATIONAL,
    # the audit log and tokens
    ("GET", "/api/v1/audit"): frozenset({NATIONAL_ADMIN, ANY_CITY_ADMIN}),
    ("GET", "/api/v1/audit/anonymous"): _NATIONAL,
    ("GET", "/api/v1/tokens"): frozenset({ANY_ROLE}),
    ("DELETE", "/api/v1/tokens/<token_id>"): frozenset({ANY_ROLE}),
}


def openapi_path(rule: str) -> str:
    """``/api/v1/vouchers/<code>`` → ``/api/v1/vouchers/{code}`` (converters
    dropped: ``<int:dead_letter_id>`` → ``{dead_letter_id}``)."""
    out, rest = "", rule
    while "<" in rest:
        head, _, tail = rest.partition("<")
        name, _, rest = tail.partition(">")
        out += head + "{" + name.rpartition(":")[2] + "}"
    return out + rest
