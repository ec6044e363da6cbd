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
- ``own_city_admin``: the staff of the path's city (or of the voucher's city,
  or of a city where the path's company holds a voucher);
- ``own_company``: the holder of the path's voucher;
- ``any_company``: any company, for itself (a company is one identity in
  every city: it applies, and lists its own vouchers, in any of them);
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
ANY_COMPANY = "any_company"
OWN_DATACENTER = "own_datacenter"
ANY_CITY_ADMIN = "any_city_admin"
ANY_DATACENTER = "any_datacenter"
ANY_ROLE = "any_role"

_PUBLIC = frozenset({ANYONE})
_NATIONAL = frozenset({NATIONAL_ADMIN})
_VOUCHER_READERS = frozenset({NATIONAL_ADMIN, OWN_CITY_ADMIN, OWN_COMPANY})
_CITY_STAFF = frozenset({NATIONAL_ADMIN, OWN_CITY_ADMIN})
_HOLDER = frozenset({OWN_COMPANY})
_APPLICANTS = frozenset({NATIONAL_ADMIN, OWN_CITY_ADMIN, ANY_COMPANY})
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
    ("POST", "/api/v1/cities/<city>/applications"): _APPLICANTS,
    ("GET", "/api/v1/cities/<city>/applications"): _CITY_STAFF,
    ("POST", "/api/v1/cities/<city>/applications/<application_id>/review"): (
        _CITY_STAFF
    ),
    ("GET", "/api/v1/cities/<city>/vouchers"): _APPLICANTS,
    ("GET", "/api/v1/vouchers/<code>"): _VOUCHER_READERS,
    ("GET", "/api/v1/vouchers/<code>/statement"): _VOUCHER_READERS,
    ("GET", "/api/v1/vouchers/<code>/redemptions"): _VOUCHER_READERS,
    # a month of it as JSON, CSV or PDF (issue 17)
    ("GET", "/api/v1/vouchers/<code>/statements/<month>"): _VOUCHER_READERS,
    ("POST", "/api/v1/vouchers/<code>/revoke"): _CITY_STAFF,
    # its holder's consent (issue 15): city staff read, only the company decides
    ("GET", "/api/v1/vouchers/<code>/bindings"): _VOUCHER_READERS,
    ("PUT", "/api/v1/vouchers/<code>/bindings/<datacenter_id>/<tenant_id>"): (_HOLDER),
    ("DELETE", "/api/v1/vouchers/<code>/bindings/<datacenter_id>/<tenant_id>"): (
        _HOLDER
    ),
    # data centres
    ("GET", "/api/v1/datacenters/<datacenter_id>/usage/tenants"): _DATACENTER,
    ("GET", "/api/v1/datacenters/<datacenter_id>/usage/hourly"): _DATACENTER,
    ("GET", "/api/v1/datacenters/<datacenter_id>/keys"): _DATACENTER,
    ("POST", "/api/v1/datacenters/<datacenter_id>/keys"): _DATACENTER,
    ("DELETE", "/api/v1/datacenters/<datacenter_id>/keys/<key_id>"): _DATACENTER,
    ("GET", "/api/v1/dead-letters"): frozenset({NATIONAL_ADMIN, ANY_DATACENTER}),
    # refused and held shares; what each sees of it: gateway/integrity.py
    ("GET", "/api/v1/integrity"): frozenset(
        {NATIONAL_ADMIN, ANY_CITY_ADMIN, ANY_DATACENTER}
    ),
    ("POST", "/api/v1/dead-letters/<int:dead_letter_id>/replay"): _NATIONAL,
    # a city's refusal, replayed (metering re-sends the record, replay: true)
    ("POST", "/api/v1/dead-letters/city:<int:refusal_id>/replay"): _NATIONAL,
    # a city's review queue and clawbacks (issue 15)
    ("GET", "/api/v1/cities/<city>/held"): _CITY_STAFF,
    ("POST", "/api/v1/cities/<city>/held/<datacenter_id>/<record_id>/decision"): (
        _CITY_STAFF
    ),
    ("POST", "/api/v1/vouchers/<code>/clawbacks"): _CITY_STAFF,
    # membership and the national read model
    ("POST", "/api/v1/cities"): _NATIONAL,
    ("DELETE", "/api/v1/cities/<city>"): _NATIONAL,
    ("POST", "/api/v1/cities/<city>/broker-credentials"): _NATIONAL,
    ("POST", "/api/v1/datacenters"): _NATIONAL,
    ("DELETE", "/api/v1/datacenters/<datacenter_id>"): _NATIONAL,
    ("POST", "/api/v1/datacenters/<datacenter_id>/broker-credentials"): _NATIONAL,
    ("POST", "/api/v1/network/reconciliation"): _NATIONAL,
    ("POST", "/api/v1/network/reconciliation/rebuild"): _NATIONAL,
    # federation events the registry set aside (issue 16)
    ("GET", "/api/v1/parked-events"): _NATIONAL,
    ("POST", "/api/v1/parked-events/<int:parked_id>/replay"): _NATIONAL,
    # the audit log and tokens
    ("GET", "/api/v1/audit"): frozenset({NATIONAL_ADMIN, ANY_CITY_ADMIN}),
    ("GET", "/api/v1/audit/anonymous"): _NATIONAL,
    ("GET", "/api/v1/tokens"): frozenset({ANY_ROLE}),
    # the city: where the company holds a voucher (test_company_tokens)
    ("POST", "/api/v1/companies/<credit_code>/token"): _CITY_STAFF,
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
