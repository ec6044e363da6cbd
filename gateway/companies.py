"""Companies as principals on the portal (DESIGN.md §2, §8; CONTRACTS.md §7).

A company is one legal person nationally, named by its unified social credit
code: its role is ``company:<credit code>`` in every city. This module holds
what the portal does for it beyond the voucher views:

- a credit code entering the portal (a path, an application) is checked by
  its check character first: a mistyped one is 400 ``invalid_credit_code``;
- its portal token, shown **once**: in the answer to the application (or the
  review) that issues its first voucher, when it has no live token yet. The
  registry decides that atomically (``issue_company_token``), so of two first
  vouchers issued at once only one answer carries a token;
- ``POST /api/v1/companies/<credit code>/token``: a new token (the earlier
  ones revoked), for the national admin or the staff of a city where the
  company holds a voucher (that city's ledger says so);
- its vouchers in every city, for the dashboard.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, jsonify
from marshmallow import ValidationError

from gateway import directory
from gateway.audit import note
from gateway.auth import AUTH_CACHE, CITY_ADMIN, forbid, require_role
from gateway.schemas import CompanyTokenSchema
from services.common import creditcode
from services.common.errors import InvalidRequest

log = logging.getLogger(__name__)

companies = Blueprint("companies", __name__, url_prefix="/api/v1")

INVALID_CREDIT_CODE = "invalid_credit_code"


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


def parse_credit_code(text: str) -> str:
    """The code, normalised, or 400 ``invalid_credit_code`` saying why."""
    try:
        return creditcode.parse(text)
    except creditcode.InvalidCreditCode as exc:
        raise InvalidRequest(
            INVALID_CREDIT_CODE,
            f"not a unified social credit code: {exc}",
            {"credit_code": text},
        ) from None


def credit_code_refusal(err: ValidationError) -> InvalidRequest | None:
    """An application's ``company.registration_id`` refused by the schema,
    as ``invalid_credit_code`` (the schema's other messages in its details);
    None when the credit code is not what is wrong."""
    company = err.messages.get("company") if isinstance(err.messages, dict) else None
    problems = company.get("registration_id") if isinstance(company, dict) else None
    if not problems:
        return None
    return InvalidRequest(
        INVALID_CREDIT_CODE,
        f"company.registration_id is not a unified social credit code: {problems[0]}",
        err.messages,
    )


def with_first_token(answer: dict[str, Any]) -> dict[str, Any]:
    """``answer`` (an application decided or reviewed) with
    ``company_token`` when it issued a voucher to a company that has no live
    token yet; as it is otherwise.

    The voucher is issued whatever happens here: a registry that cannot be
    asked now costs the company its token in this answer (logged and
    audited), not the answer itself; a city's staff can re-issue it.
    """
    company_id = (answer.get("voucher") or {}).get("company_id")
    if not company_id:
        return answer
    try:
        issued = _rpc("city_registry", "issue_company_token", company_id)
    except Exception as exc:  # noqa: BLE001 - the voucher is issued all the same
        log.warning("no company token for %s: %r", company_id, exc)
        note(company_token=f"not issued: {exc.__class__.__name__}")
        return answer
    if issued is None:
        return answer  # it has a live token: never shown twice
    note(company_token_id=issued["id"])
    return answer | {"company_token": issued["token"]}


def holds_voucher_in(city: str, company_id: str) -> bool:
    """Whether ``city``'s ledger has a voucher (of any status) of the company."""
    found = _rpc(
        f"vouchers_{city}", "list_vouchers", company_id=company_id, limit=1, offset=0
    )
    return bool((found or {}).get("total"))


@companies.post("/companies/<credit_code>/token")
def reissue_token(credit_code: str):
    """A new portal token of the company, shown once; its earlier tokens are
    revoked (a lost or leaked token, a company that never received one)."""
    code = parse_credit_code(credit_code)  # 400 before the token is checked
    role = require_role()
    if role.kind == CITY_ADMIN:
        directory.known_city(role.city)  # a removed city's ledger is not asked
        if not holds_voucher_in(role.city, code):
            raise forbid(f"{code} holds no voucher of {role.city}")
    elif not role.is_national_admin:
        raise forbid(
            "only the national admin and the staff of a city where the company "
            "holds a voucher may re-issue its token"
        )
    issued = _rpc("city_registry", "reissue_company_token", code)
    # The revoked tokens are refused by this portal at once (others: 30 s).
    current_app.extensions[AUTH_CACHE].clear()
    note(
        token_id=issued["id"],
        token_role=issued["role"],
        revoked_tokens=issued.get("revoked_tokens"),
    )
    return jsonify(CompanyTokenSchema().dump(issued)), 201


def company_vouchers(company_id: str, cities: list[dict[str, Any]]) -> dict:
    """The company's vouchers in every live city of ``cities`` (the
    registry's list), asked city by city: ``{"vouchers", "unavailable"}``,
    the cities that could not be asked named rather than failing the page."""
    vouchers: list[dict[str, Any]] = []
    unavailable: list[str] = []
    for city in cities:
        if city.get("status") != "live":
            continue
        try:
            found = _rpc(
                f"vouchers_{city['code']}",
                "list_vouchers",
                company_id=company_id,
                limit=100,
                offset=0,
            )
        except Exception as exc:  # noqa: BLE001 - one city down, the rest shown
            log.warning("vouchers of %s in %s: %r", company_id, city["code"], exc)
            unavailable.append(city["code"])
            continue
        vouchers += (found or {}).get("items") or []
    return {"vouchers": vouchers, "unavailable": unavailable}


def _ok(description: str, schema: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


OPENAPI_SCHEMAS = {"CompanyToken": CompanyTokenSchema}

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/companies/{credit_code}/token": {
        "post": {
            "summary": "Re-issue a company's portal token, shown once; its earlier "
            "tokens are revoked (national admin; the staff of a city where "
            "it holds a voucher)",
            "description": (
                "A company's first token comes in the answer to the "
                "application (or review) that issues its first voucher "
                "(`company_token`); this is how it gets another. A mistyped "
                "credit code is 400 invalid_credit_code; a city where the "
                "company holds no voucher is 403."
            ),
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "in": "path",
                    "name": "credit_code",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "unified social credit code (18 characters)",
                }
            ],
            "responses": {
                "201": _ok("the new token", "CompanyToken"),
                **{
                    str(status): _ok("error", "Error")
                    for status in (400, 401, 403, 503)
                },
            },
        }
    }
}
