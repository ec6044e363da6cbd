"""A voucher's monthly statement as a PDF a finance department can file.

Rendered with fpdf2 (pinned in pyproject.toml): pure Python, its own table
layout that breaks over pages and repeats the headings on each, and no
native toolchain, where reportlab's tables need its flowables and platypus
framework for the same. Amounts are CNY with two decimals formatted from
integer fen (``services.common.units``), never through a float.

The built-in PDF fonts (Helvetica) cover Latin-1 only: a character outside it
(a company's Chinese name) is written as ``?`` rather than failing the whole
statement; embedding a CJK font is the way to show it (not done yet).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from fpdf import FPDF
from fpdf.enums import WrapMode
from fpdf.fonts import FontFace

from services.common.units import format_cny_grouped, format_ts, parse_ts

FONT = "Helvetica"
JOB_HEADINGS = (
    "Record",
    "Data centre",
    "Tenant",
    "GPUs",
    "Started (UTC)",
    "Ended (UTC)",
    "GPU-h",
    "Cost",
    "Subsidy",
    "Company pays",
)
# Landscape A4 less the margins: 277 mm over the columns above.
JOB_WIDTHS = (44, 30, 30, 20, 30, 30, 16, 26, 26, 25)
NUMERIC = ("RIGHT",) * 4
ALIGN = ("LEFT",) * 6 + NUMERIC


def _text(value: Any) -> str:
    """What the core font can write: Latin-1, the rest as ``?``."""
    text = "" if value is None else str(value)
    return text.encode("latin-1", "replace").decode("latin-1")


def _cny(fen: int | None) -> str:
    return "" if fen is None else format_cny_grouped(fen)


def _when(value: Any) -> str:
    if value in (None, ""):
        return ""
    moment = value if isinstance(value, datetime) else parse_ts(value)
    return format_ts(moment).replace("T", " ").removesuffix("Z")


def _gpus(line: Mapping[str, Any]) -> str:
    model, count = line.get("gpu_model"), line.get("gpu_count")
    if model is None:
        return ""
    return f"{count} x {model}" if count else str(model)


def _job_row(line: Mapping[str, Any]) -> list[str]:
    return [
        _text(line.get("record_id")),
        _text(line.get("datacenter_id")),
        _text(line.get("tenant_id")),
        _text(_gpus(line)),
        _when(line.get("started_at")),
        _when(line.get("ended_at")),
        line.get("gpu_hours") or "",
        _cny(line.get("cost_fen")),
        _cny(line.get("subsidy_fen")),
        _cny(line.get("company_pays_fen")),
    ]


class _Statement(FPDF):
    """Pages numbered in the footer, the voucher and month on every page."""

    def __init__(self, caption: str):
        super().__init__(orientation="landscape", format="A4")
        self.caption = caption
        self.set_auto_page_break(auto=True, margin=15)
        self.set_margins(10, 10, 10)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(FONT, size=7)
        self.cell(0, 5, f"{self.caption} - page {self.page_no()}/{{nb}}", align="C")


def _section(pdf: FPDF, title: str) -> None:
    pdf.ln(3)
    pdf.set_font(FONT, "B", 10)
    pdf.cell(0, 6, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(FONT, size=7)


def _table(pdf: FPDF, headings, widths, align, rows) -> None:
    with pdf.table(
        col_widths=widths,
        text_align=align,
        width=sum(widths),
        align="LEFT",
        line_height=4,
        headings_style=FontFace(emphasis="BOLD"),
        repeat_headings=1,
        wrapmode=WrapMode.CHAR,  # record ids have no spaces to break at
    ) as table:
        for row in [headings, *rows]:
            cells = table.row()
            for value in row:
                cells.cell(value)


def render(statement: Mapping[str, Any]) -> bytes:
    """The PDF of a ``MonthlyStatementSchema`` dump."""
    code, month = statement["voucher_code"], statement["month"]
    pdf = _Statement(f"Voucher {code}, statement of {month}")
    pdf.add_page()
    pdf.set_font(FONT, "B", 14)
    city = statement.get("city_name") or statement.get("city")
    pdf.cell(
        0,
        8,
        _text(f"{city}: voucher statement, {month}"),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    pdf.set_font(FONT, size=9)
    company = statement.get("company_name") or ""
    head = [
        ("Voucher", code),
        ("Program", statement.get("program_id")),
        ("Company", f"{company} ({statement.get('company_id')})"),
        (
            "Period (UTC)",
            f"{_when(statement['period_start'])} to {_when(statement['period_end'])}",
        ),
        ("Face value (CNY)", _cny(statement.get("face_value_fen"))),
        ("Opening balance (CNY)", _cny(statement["opening_balance_fen"])),
        ("Closing balance (CNY)", _cny(statement["closing_balance_fen"])),
    ]
    for label, value in head:
        pdf.cell(45, 5, label)
        pdf.cell(0, 5, _text(value), new_x="LMARGIN", new_y="NEXT")

    _section(pdf, "Subsidised jobs (amounts in CNY)")
    jobs = [_job_row(line) for line in statement["jobs"]]
    if jobs:
        _table(pdf, JOB_HEADINGS, JOB_WIDTHS, ALIGN, jobs)
    else:
        pdf.cell(0, 5, "No subsidised job this month.", new_x="LMARGIN", new_y="NEXT")
    if statement["clawbacks"]:
        _section(pdf, "Subsidies given back: clawbacks, corrections, holds (CNY)")
        rows = [_job_row(line) for line in statement["clawbacks"]]
        _table(pdf, JOB_HEADINGS, JOB_WIDTHS, ALIGN, rows)
    if statement["releases"]:
        _section(pdf, "Released to the program's budget (CNY)")
        rows = [
            [
                _text(line["reason"]),
                _when(line["released_at"]),
                _text(line.get("record_id")),
                _cny(line["released_fen"]),
            ]
            for line in statement["releases"]
        ]
        _table(
            pdf,
            ("Reason", "When (UTC)", "Record", "Released"),
            (50, 40, 60, 30),
            ("LEFT", "LEFT", "LEFT", "RIGHT"),
            rows,
        )

    totals = statement["totals"]
    _section(pdf, "Totals (CNY)")
    rows = [
        ["Opening balance", _cny(statement["opening_balance_fen"])],
        ["+ Issued", _cny(totals["issued_fen"])],
        [
            f"- Subsidies ({totals['jobs']} jobs, {totals['gpu_hours']} GPU-h, "
            f"cost {_cny(totals['cost_fen'])}, company pays "
            f"{_cny(totals['company_pays_fen'])})",
            _cny(totals["subsidies_fen"]),
        ],
        ["+ Clawbacks", _cny(totals["clawbacks_fen"])],
        ["- Released", _cny(totals["released_fen"])],
        ["= Closing balance", _cny(statement["closing_balance_fen"])],
    ]
    _table(pdf, ("", "CNY"), (150, 40), ("LEFT", "RIGHT"), rows)
    if not statement.get("reconciled", True):
        pdf.set_font(FONT, "B", 9)
        pdf.cell(0, 6, "These figures do not reconcile with the ledger.")
    return bytes(pdf.output())
