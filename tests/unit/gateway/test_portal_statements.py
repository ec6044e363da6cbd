"""The portal's monthly statement (issue 17): JSON, CSV and a PDF a finance
department can file, from a statement the real ledger made (SQLite,
``tests/support/statement_data.py``). The PDF is rendered to an image with
``pdftoppm`` and read back with ``pdftotext``."""

from __future__ import annotations

import csv
import io
import re
import subprocess

import pytest

from services.common.units import format_cny_grouped
from tests.support.statement_data import FACE_FEN, ledger_statement, serve


@pytest.fixture(scope="module")
def statement():
    return ledger_statement(jobs=2)


@pytest.fixture
def served(rpc, statement):
    serve(rpc, statement)
    return statement


def _get(client, token_for, statement, suffix="", role="national_admin", **kw):
    url = (
        f"/api/v1/vouchers/{statement['voucher_code']}/statements/"
        f"{statement['month']}{suffix}"
    )
    return client.get(url, headers={**token_for(role), **kw.pop("headers", {})}, **kw)


def _pdf_text(tmp_path, pdf: bytes) -> str:
    path = tmp_path / "statement.pdf"
    path.write_bytes(pdf)
    subprocess.run(
        ["pdftoppm", "-png", "-r", "40", "-f", "1", "-l", "1", path, tmp_path / "p"],
        check=True,
    )
    [image] = tmp_path.glob("p*.png")
    assert (
        image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 1000
    )
    done = subprocess.run(
        ["pdftotext", "-layout", path, "-"], check=True, capture_output=True
    )
    return done.stdout.decode()


def test_json_is_the_ledger_statement(client, token_for, served):
    answer = _get(client, token_for, served)
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["opening_balance_fen"] == 0
    assert body["totals"]["issued_fen"] == FACE_FEN
    assert body["closing_balance_fen"] == FACE_FEN - body["totals"]["subsidies_fen"]
    assert [line["cost_fen"] for line in body["jobs"]] == [12_345, 12_346]
    assert body["reconciled"] is True


def test_pdf_shows_the_voucher_month_balances_and_each_job(
    client, token_for, served, tmp_path
):
    answer = _get(client, token_for, served, query_string={"format": "pdf"})
    assert answer.status_code == 200 and answer.mimetype == "application/pdf"
    assert answer.data.startswith(b"%PDF-")
    assert "attachment" in answer.headers["Content-Disposition"]
    text = _pdf_text(tmp_path, answer.data)
    job = served["jobs"][0]
    assert served["voucher_code"] in text and served["month"] in text
    assert "Test City" in text and served["company_id"] in text
    for fen in (served["opening_balance_fen"], served["closing_balance_fen"]):
        assert format_cny_grouped(fen) in text
    assert format_cny_grouped(FACE_FEN) == "1,000.00" and "1,000.00" in text
    row = next(line for line in text.splitlines() if job["record_id"] in line)
    for figure in (
        job["datacenter_id"],
        job["tenant_id"],
        "1 x H800",
        job["gpu_hours"],
        format_cny_grouped(job["cost_fen"]),
        format_cny_grouped(job["subsidy_fen"]),
        format_cny_grouped(job["company_pays_fen"]),
    ):
        assert figure in row, figure
    assert format_cny_grouped(served["totals"]["subsidies_fen"]) in text


def test_pdf_by_suffix_and_by_accept(client, token_for, served):
    by_suffix = _get(client, token_for, served, ".pdf")
    by_accept = _get(client, token_for, served, headers={"Accept": "application/pdf"})
    assert by_suffix.mimetype == by_accept.mimetype == "application/pdf"


def test_many_jobs_run_over_pages_with_their_headings(rpc, client, token_for, tmp_path):
    statement = ledger_statement(jobs=120, cost_fen=500)
    serve(rpc, statement)
    answer = _get(client, token_for, statement, ".pdf")
    path = tmp_path / "long.pdf"
    path.write_bytes(answer.data)
    info = subprocess.run(["pdfinfo", path], check=True, capture_output=True).stdout
    pages = int(re.search(rb"Pages:\s+(\d+)", info)[1])
    assert pages >= 3
    text = _pdf_text(tmp_path, answer.data)
    with_jobs = [
        page
        for page in text.split("\f")
        if any(line["record_id"] in page for line in statement["jobs"])
    ]
    assert len(with_jobs) >= 3
    assert all("Company pays" in page for page in with_jobs)  # headings repeated
    assert all(line["record_id"] in text for line in statement["jobs"])


def _csv(answer):
    assert answer.status_code == 200 and answer.mimetype == "text/csv"
    head, lines = answer.get_data(as_text=True).split("\r\n\r\n")
    return dict(list(csv.reader(io.StringIO(head)))[1:]), list(
        csv.DictReader(io.StringIO(lines))
    )


@pytest.mark.parametrize(
    "how",
    [
        {"query_string": {"format": "csv"}},
        {"suffix": ".csv"},
        {"headers": {"Accept": "text/csv"}},
    ],
)
def test_csv_has_a_header_block_and_the_lines(client, token_for, served, how):
    head, lines = _csv(_get(client, token_for, served, **how))
    assert head["voucher_code"] == served["voucher_code"]
    assert head["month"] == served["month"]
    assert int(head["opening_balance_fen"]) == served["opening_balance_fen"]
    assert int(head["closing_balance_fen"]) == served["closing_balance_fen"]
    assert int(head["total_subsidies_fen"]) == served["totals"]["subsidies_fen"]
    assert [line["record_id"] for line in lines] == [
        job["record_id"] for job in served["jobs"]
    ]
    job, line = served["jobs"][0], lines[0]
    assert line["section"] == "job"
    assert int(line["company_pays_fen"]) == job["company_pays_fen"]
    assert int(line["cost_fen"]) - int(line["subsidy_fen"]) == job["company_pays_fen"]


def test_a_malformed_month_is_400_before_anything_is_asked(client, token_for, rpc):
    answer = client.get(
        "/api/v1/vouchers/SH-7K3F9QXD2M4A-R/statements/2026-3",
        headers=token_for("national_admin"),
    )
    code = "SH-7K3F9QXD2M4A-R"
    assert answer.status_code == 400, code
    assert answer.get_json()["error"] in ("invalid_month", "invalid_voucher_code")
    assert rpc.called("vouchers_shanghai", "monthly_statement") == []


def test_month_out_of_range_comes_through(client, token_for, rpc, served):
    from services.common.errors import NotFound

    rpc.replies[("vouchers_testcity", "monthly_statement")] = NotFound(
        "month_out_of_range", "statements run from 2026-12 to 2026-12"
    )
    answer = _get(client, token_for, served)
    assert answer.status_code == 404
    assert answer.get_json()["error"] == "month_out_of_range"


def _sign_in(client, token_for, role):
    token = token_for(role)["Authorization"].split()[1]
    assert client.post("/login", data={"token": token}).status_code == 302


def test_the_dashboard_links_each_month_to_its_pdf_and_csv(
    client, token_for, rpc, served
):
    holder = f"company:{served['company_id']}"
    rpc.replies[("vouchers_testcity", "get_voucher")] = {
        "code": served["voucher_code"],
        "company_id": served["company_id"],
        "issued_at": served["issued_at"],
        "redemptions": [],
        **{f"{name}_fen": 0 for name in ("balance", "face_value", "redeemed")},
        "released_fen": 0,
    }
    _sign_in(client, token_for, holder)
    html = client.get(f"/vouchers/{served['voucher_code']}").get_data(as_text=True)
    link = f"/vouchers/{served['voucher_code']}/statements/{served['month']}.pdf"
    assert link in html and link.replace(".pdf", ".csv") in html
    pdf = client.get(link)
    assert pdf.status_code == 200 and pdf.mimetype == "application/pdf"
    assert client.get(link.replace(".pdf", ".csv")).mimetype == "text/csv"


def test_the_dashboard_refuses_another_company_and_the_signed_out(
    client, token_for, served
):
    link = f"/vouchers/{served['voucher_code']}/statements/{served['month']}.pdf"
    assert client.get(link).status_code == 302  # to the sign-in
    _sign_in(client, token_for, "company:91310000MA1QA0001K")
    answer = client.get(link)
    assert answer.status_code == 404 and answer.mimetype != "application/pdf"


def test_months_since_the_issue_latest_first():
    from datetime import UTC, datetime

    from gateway.statements_api import months_since

    now = datetime(2026, 2, 10, tzinfo=UTC)
    assert months_since("2025-11-30T23:00:00Z", now) == [
        "2026-02",
        "2026-01",
        "2025-12",
        "2025-11",
    ]
    assert len(months_since("2001-01-01T00:00:00Z", now)) == 24
