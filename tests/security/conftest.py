"""The security ring: attacks that must fail, each beside the legitimate path
that must keep working.

DESIGN.md §8 says who may do what; issue 14 lists how a dishonest member or
an anonymous caller gets round it today. Every test module here takes one
boundary and pairs each attack (``test_formula_cell_is_neutralised``) with
the ordinary use of the same door (``test_plain_cells_are_unchanged``), so a
fix that merely closes the door shows up as a failing legitimate test.

What the ring covers so far, all over HTTP:

- ``test_csv_exports.py``: CSV cells a spreadsheet would run as formulas;
- ``test_sign_in.py``: the dashboard's ``next`` (no open redirect) and the
  session cookie's flags (``HttpOnly``, ``SameSite=Lax``, ``Secure`` over
  HTTPS);
- ``test_body_limits.py``: oversized bodies on the portal and on a data
  centre's agent API, answered 413 before any work is done;
- ``test_voucher_recommendations.py``: recommendations priced with a voucher,
  for its company, its city and the nation only;
- ``test_unknown_names.py``: made-up cities, voucher prefixes and tokens,
  answered from bounded memory, never routed to a service that is not there.

The apps are the real ones (``create_app``); the portal's RPC client is the
fake of ``tests/support/portal_app.py`` and the agent API writes to a SQLite
outbox (``tests/support/agent_api.py``). Attacks on the bus (RPC by caller,
shared topology, broker permissions) belong here too, against the real
RabbitMQ and PostgreSQL of the integration ring. ``make security`` runs the
ring alone; ``make test`` runs it with the others.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def sign_in(client, token_for) -> Callable[..., object]:
    """``sign_in(role, next=…)`` → the dashboard's answer to a sign-in with a
    valid token of ``role`` (a redirect, with the session cookie set)."""

    def post(role: str = "national_admin", **form: str):
        token = token_for(role)["Authorization"].split()[1]
        return client.post("/login", data={"token": token, **form})

    return post


HOLDER = "91310000MA1FL5XX1G"  # the company holding the network's one voucher
OTHER_COMPANY = "91310000MA1QA0001K"  # a company holding nothing


@pytest.fixture
def network(rpc) -> dict[str, object]:
    """Two live cities and a removed one; shanghai has issued one voucher,
    to ``HOLDER``. Returns the voucher's code and what the fake answers."""
    from services.common import vouchercode

    code = vouchercode.generate("SH")
    cities = [
        {"code": "shanghai", "name": "Shanghai", "voucher_prefix": "SH"},
        {"code": "beijing", "name": "Beijing", "voucher_prefix": "BJ"},
        {"code": "oldtown", "name": "Old Town", "status": "removed"},
    ]
    for city in cities:
        city.setdefault("status", "live")
    voucher = {"code": code, "city": "shanghai", "company_id": HOLDER}
    rpc.replies.update(
        {
            ("city_registry", "list_cities"): cities,
            ("city_registry", "get_city"): lambda c: next(
                city for city in cities if city["code"] == c
            ),
            ("city_registry", "voucher_prefixes"): {"SH": "shanghai", "BJ": "beijing"},
            ("city_registry", "recommend_datacenters"): lambda *a, **k: {
                "gpu_model": a[0],
                "gpus": a[1],
                "hours": a[2],
                "voucher": k.get("voucher"),
                "items": [],
            },
            ("vouchers_shanghai", "get_voucher"): lambda c: voucher,
            ("vouchers_shanghai", "list_vouchers"): lambda **k: {
                "items": [],
                "total": 0,
            },
        }
    )
    return {"code": code, "voucher": voucher}
