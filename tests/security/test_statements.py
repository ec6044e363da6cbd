"""A voucher's monthly statements (issue 17): only its readers get them.

Its company, its city's staff and the ministry get the month as JSON, CSV
and PDF; another company gets 404 (not even whether the voucher, or that
month of it, exists: the city is asked with the caller's credit code),
another city's staff and a data centre 403, an anonymous caller 401, in
every format. A tenant id a data centre chose reaches the CSV as text, not
as a formula.
"""

from __future__ import annotations

import csv
import io

import pytest

from services.common.errors import NotFound
from tests.security.conftest import HOLDER, OTHER_COMPANY
from tests.security.test_csv_exports import FORMULAS
from tests.support.statement_data import ledger_statement

MONTH = "2026-03"
FORMATS = ("", "?format=csv", "?format=pdf", ".pdf")


@pytest.fixture(scope="module")
def made():
    return ledger_statement(jobs=1)


@pytest.fixture
def statement(network, rpc, made):
    """The network's voucher (shanghai's, held by HOLDER) with the ledger's
    figures; the city answers as services/vouchers/ledger/statements.py."""
    body = dict(made, voucher_code=network["code"], company_id=HOLDER, month=MONTH)

    def answer(code, month, company_id=None):
        if company_id not in (None, HOLDER):
            raise NotFound("voucher_not_found", f"no voucher {code}")
        return body

    rpc.replies[("vouchers_shanghai", "monthly_statement")] = answer
    return body


def _url(statement, fmt=""):
    suffix, query = (fmt, "") if fmt.startswith(".") else ("", fmt)
    code = statement["voucher_code"]
    return f"/api/v1/vouchers/{code}/statements/{MONTH}{suffix}{query}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "role", ["national_admin", "city_admin:shanghai", f"company:{HOLDER}"]
)
def test_its_readers_get_it(client, token_for, statement, role, fmt):
    answer = client.get(_url(statement, fmt), headers=token_for(role))
    assert answer.status_code == 200
    assert statement["voucher_code"].encode() in answer.data or fmt.endswith("pdf")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "role, status, error",
    [
        (f"company:{OTHER_COMPANY}", 404, "voucher_not_found"),
        ("city_admin:beijing", 403, "forbidden"),
        ("datacenter:guian-gov-01", 403, "forbidden"),
        (None, 401, None),
    ],
)
def test_others_are_refused_and_learn_nothing(
    client, token_for, rpc, statement, role, status, error, fmt
):
    headers = token_for(role) if role else {}
    answer = client.get(_url(statement, fmt), headers=headers)
    assert answer.status_code == status
    assert answer.mimetype == "application/json"
    if error:
        assert answer.get_json()["error"] == error
    assert statement["jobs"][0]["record_id"] not in answer.get_data(as_text=True)
    asked = rpc.called("vouchers_shanghai", "monthly_statement")
    if role and role.startswith("company:"):
        # asked only with its own credit code: the city refuses it
        assert [args for args, _ in asked] == [
            (statement["voucher_code"], MONTH, OTHER_COMPANY)
        ]
    else:
        assert asked == []


def test_a_company_is_asked_for_as_itself(client, token_for, rpc, statement):
    client.get(_url(statement), headers=token_for(f"company:{HOLDER}"))
    client.get(_url(statement), headers=token_for("city_admin:shanghai"))
    asked = [
        args[2] for args, _ in rpc.called("vouchers_shanghai", "monthly_statement")
    ]
    assert asked == [HOLDER, None]


@pytest.mark.parametrize("formula", FORMULAS, ids=repr)
def test_a_tenant_formula_reaches_the_csv_as_text(
    client, token_for, statement, formula
):
    statement["jobs"] = [
        dict(statement["jobs"][0], tenant_id=formula, record_id=formula)
    ]
    answer = client.get(
        _url(statement, "?format=csv"), headers=token_for(f"company:{HOLDER}")
    )
    _head, lines = answer.get_data(as_text=True).split("\r\n\r\n")
    [row] = csv.DictReader(io.StringIO(lines))
    assert row["tenant_id"] == "'" + formula and row["record_id"] == "'" + formula
    # numbers stay numbers, a plain tenant stays as it was
    assert row["cost_fen"] == str(statement["jobs"][0]["cost_fen"])


def test_a_plain_tenant_is_unchanged(client, token_for, statement):
    answer = client.get(
        _url(statement, "?format=csv"), headers=token_for(f"company:{HOLDER}")
    )
    _head, lines = answer.get_data(as_text=True).split("\r\n\r\n")
    [row] = csv.DictReader(io.StringIO(lines))
    assert row["tenant_id"] == "tenant-1"
