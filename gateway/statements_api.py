"""A voucher's monthly statement on the portal (issue 17): JSON, CSV or PDF.

``GET /api/v1/vouchers/<code>/statements/<YYYY-MM>`` — the voucher's
readers (its company, its city's staff, the ministry; ``gateway/access.py``)
get the month's opening balance, each subsidised job, what was given back
and released, and the closing balance, as the city's ledger reconciles them
(``services/vouchers/ledger/statements.py``). The format is chosen by
``?format=json|csv|pdf``, else by a ``.csv`` / ``.pdf`` suffix on the month,
else by ``Accept`` (JSON first, as for every CSV export of the portal).

Another company learns nothing, not even which months exist: the city is
asked with the caller's credit code, and answers 404 ``voucher_not_found``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from marshmallow import RAISE, Schema, fields, validate

from gateway.auth import COMPANY, Role, require_role
from gateway.listing import CSV, csv_blocks_response
from gateway.review_api import _err, _param
from gateway.statement_pdf import render
from gateway.vouchers import check_holder, parse_code, voucher_city
from services.common.units import month_bounds, month_of, parse_ts
from services.vouchers.schemas import MonthlyStatementSchema

statements = Blueprint("statements", __name__, url_prefix="/api/v1")

PDF = "application/pdf"
FORMATS = ("json", "csv", "pdf")
# The columns of a statement's lines in its CSV, after the header block.
LINE_COLUMNS = (
    "section",
    "record_id",
    "datacenter_id",
    "tenant_id",
    "gpu_model",
    "gpu_count",
    "started_at",
    "ended_at",
    "gpu_seconds",
    "gpu_hours",
    "cost_fen",
    "rate_bp",
    "subsidy_fen",
    "company_pays_fen",
    "booked_at",
    "released_fen",
    "reason",
)
HEADER_FIELDS = (
    "voucher_code",
    "month",
    "period_start",
    "period_end",
    "city",
    "city_name",
    "program_id",
    "company_id",
    "company_name",
    "face_value_fen",
    "opening_balance_fen",
    "closing_balance_fen",
    "reconciled",
)
_STATEMENT = MonthlyStatementSchema()


class StatementQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    format = fields.String(
        load_default=None,
        validate=validate.OneOf(FORMATS),
        metadata={
            "description": "csv or pdf (or a .csv/.pdf suffix on the month, "
            "or Accept: text/csv / application/pdf)"
        },
    )


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


def _month_and_format(month: str, query: dict) -> tuple[str, str]:
    stem, dot, suffix = month.rpartition(".")
    if dot and suffix in ("csv", "pdf"):
        month, chosen = stem, suffix
    else:
        chosen = None
    chosen = query.get("format") or chosen
    if chosen is None:
        best = request.accept_mimetypes.best_match(["application/json", CSV, PDF])
        chosen = {CSV: "csv", PDF: "pdf"}.get(best or "", "json")
    return month, chosen


def months_since(issued_at: str, now: datetime, most: int = 24) -> list[str]:
    """The months that have a statement, latest first (at most ``most``)."""
    first = month_of(parse_ts(issued_at))
    year, number = now.year, now.month
    months = []
    while len(months) < most:
        month = f"{year:04d}-{number:02d}"
        if month < first:
            break
        months.append(month)
        year, number = (year, number - 1) if number > 1 else (year - 1, 12)
    return months


def statement_csv(statement: dict[str, Any]) -> list[list[Any]]:
    """The lines block of a statement's CSV: jobs, what was given back, and
    what was released, one section column to tell them apart."""
    rows: list[list[Any]] = [list(LINE_COLUMNS)]
    sections = (("job", "jobs"), ("clawback", "clawbacks"), ("release", "releases"))
    for section, key in sections:
        for line in statement[key]:
            values = {"section": section, **line}
            rows.append([values.get(column) for column in LINE_COLUMNS])
    return rows


def _header(statement: dict[str, Any]) -> list[list[Any]]:
    rows = [["field", "value"]]
    rows += [[name, statement.get(name)] for name in HEADER_FIELDS]
    rows += [[f"total_{name}", value] for name, value in statement["totals"].items()]
    return rows


@statements.get("/vouchers/<code>/statements/<month>")
def monthly_statement(code: str, month: str):
    """A voucher's statement of one UTC calendar month."""
    parse_code(code)  # 400 before the token is even checked
    query = StatementQuerySchema().load(request.args.to_dict())
    month, chosen = _month_and_format(month, query)
    month_bounds(month)  # 400 invalid_month, before anything is asked
    return statement_response(require_role(), code, month, chosen)


def statement_response(role: Role, code: str, month: str, chosen: str) -> Response:
    """The statement in the ``chosen`` format, for a caller who may read the
    voucher (the API's bearer, or the dashboard's signed-in user)."""
    code, city = voucher_city(code, role)
    holder = role.company_id if role.kind == COMPANY else None
    found = _rpc(f"vouchers_{city}", "monthly_statement", code, month, holder)
    check_holder(role, found, code)
    statement = _STATEMENT.dump(found)
    name = f"statement-{code}-{month}"
    if chosen == "csv":
        return csv_blocks_response([_header(statement), statement_csv(statement)], name)
    if chosen == "pdf":
        response = Response(render(statement), mimetype=PDF)
        response.headers["Content-Disposition"] = f'attachment; filename="{name}.pdf"'
        return response
    return jsonify(statement)


# -- OpenAPI -----------------------------------------------------------------

OPENAPI_SCHEMAS = {"MonthlyStatement": MonthlyStatementSchema}

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/vouchers/{code}/statements/{month}": {
        "get": {
            "summary": "A voucher's statement of one UTC month (YYYY-MM): opening "
            "balance, subsidised jobs, clawbacks, releases, closing balance, "
            "reconciled to the city's ledger; JSON, CSV or PDF (its company, its "
            "city's staff, national admin)",
            "security": [{"bearer": []}],
            "parameters": [
                _param("code"),
                {
                    **_param("month"),
                    "description": "YYYY-MM, optionally with .csv or .pdf",
                },
                {
                    "in": "query",
                    "name": "format",
                    "required": False,
                    "schema": {"type": "string", "enum": list(FORMATS)},
                },
            ],
            "responses": {
                "200": {
                    "description": "the statement; 404 month_out_of_range for a "
                    "month before the voucher's issue or after this one",
                    "content": {
                        "application/json": {"schema": "MonthlyStatement"},
                        CSV: {"schema": {"type": "string"}},
                        PDF: {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                **_err(400, 401, 403, 404),
            },
        }
    },
}
