"""Collections: one page shape, and CSV for every table.

A collection answers ``{"items", "total", "limit", "offset"}``; the same rows
come as CSV with ``?format=csv`` or ``Accept: text/csv`` (an analyst's
spreadsheet). Columns are the response schema's fields in declared order;
nested values are written as JSON in their cell. A text cell that a
spreadsheet would run as a formula is written with a leading ``'`` (OWASP
"CSV injection"): names, tenants and reasons come from other parties.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any

from flask import Response, jsonify, request
from marshmallow import Schema

CSV = "text/csv"
# What makes a spreadsheet read a cell as a formula (=HYPERLINK(...), +, -,
# @SUM(...)), tab and carriage return included: some spreadsheets skip them
# and read the character after. OWASP's answer, a leading single quote, makes
# the cell text and shows the value as it was sent.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def wants_csv(query: dict[str, Any] | None = None) -> bool:
    explicit = (query or {}).get("format") or request.args.get("format")
    if explicit:
        return explicit == "csv"
    # JSON first: ``*/*`` and no Accept at all mean JSON.
    return request.accept_mimetypes.best_match(["application/json", CSV]) == CSV


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if value is None:
        return ""
    # Only text: schemas dump money, GPU-seconds and drift as int and float,
    # and a number such as -500 is written as a number, never quoted.
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_response(
    rows: Iterable[dict[str, Any]], columns: Sequence[str], filename: str
) -> Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    response = Response(buffer.getvalue(), mimetype=CSV)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
    return response


def csv_blocks_response(
    blocks: Iterable[Sequence[Sequence[Any]]], filename: str
) -> Response:
    """Several tables in one CSV (a statement's header block, then its
    lines), a blank row between them, every cell neutralised as above."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for n, rows in enumerate(blocks):
        if n:
            writer.writerow([])
        writer.writerows([_cell(value) for value in row] for row in rows)
    response = Response(buffer.getvalue(), mimetype=CSV)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
    return response


def columns_of(schema: Schema) -> list[str]:
    return [name for name, field in schema.fields.items() if not field.load_only]


def page(
    schema: Schema,
    items: Sequence[Any],
    *,
    total: int | None,
    limit: int,
    offset: int,
    name: str,
    query: dict[str, Any] | None = None,
) -> Response:
    """One page of a collection, as JSON or CSV."""
    dumped = schema.dump(items, many=True)
    if wants_csv(query):
        return csv_response(dumped, columns_of(schema), name)
    return jsonify({"items": dumped, "total": total, "limit": limit, "offset": offset})


def table(schema: Schema, items: Sequence[Any], *, name: str, query=None) -> Response:
    """A whole small collection (cities, data centres): a JSON array or CSV."""
    dumped = schema.dump(items, many=True)
    if wants_csv(query):
        return csv_response(dumped, columns_of(schema), name)
    return jsonify(dumped)
