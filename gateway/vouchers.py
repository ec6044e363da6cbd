"""A voucher code → its issuing city, for a caller who may look at it.

Shared by the API's voucher views and the recommendations: the checks run in
the order that costs least and says least (CONTRACTS.md §4, §7): a mistyped
code is 400 by its check character; a caller who may see no voucher is 403; a
prefix no city issues is 404 from the portal's directory (no RPC); a city's
staff outside the voucher's city are 403 by the prefix alone; a company, which
deals with every city, is 404 for a voucher it does not hold once the voucher
is read, as if there were nothing there.
"""

from __future__ import annotations

from flask import g

from gateway import directory
from gateway.audit import AUDIT_SCOPE
from gateway.auth import CITY_ADMIN, COMPANY, Role, forbid
from services.common import vouchercode
from services.common.errors import InvalidRequest, NotFound


def voucher_city(code: str, role: Role) -> tuple[str, str]:
    """``(normalised code, issuing city)`` when ``role`` may look at it.

    A mistyped code is refused by its check character before any lookup
    (CONTRACTS.md §4); a prefix no city owns is 404 from the portal's
    directory; a city's staff outside the voucher's city are refused by the
    code's prefix alone, before the city is asked anything. A company may
    hold vouchers of any city: :func:`check_holder` decides, once read.
    """
    prefix = parse_code(code)
    code = code.strip().upper()
    if not (role.is_national_admin or role.kind in (CITY_ADMIN, COMPANY)):
        raise forbid("vouchers are visible to their company and city only")
    city = directory.city_of_prefix(prefix)
    if city is None:
        raise voucher_not_found(code)
    if role.kind == CITY_ADMIN and role.city != city:
        raise forbid(f"this voucher belongs to {city}")
    g.setdefault(AUDIT_SCOPE, city)  # a write on it is the city's to read back
    return code, city


def parse_code(code: str) -> str:
    try:
        return vouchercode.parse(code)
    except vouchercode.InvalidVoucherCode as exc:
        raise InvalidRequest("invalid_voucher_code", str(exc)) from exc


def voucher_not_found(code: str) -> NotFound:
    return NotFound("voucher_not_found", f"no voucher {code}")


def check_holder(role: Role, voucher: dict, code: str) -> None:
    # Another company learns nothing, not even existence.
    if role.kind == COMPANY and voucher.get("company_id") != role.company_id:
        raise voucher_not_found(code)
