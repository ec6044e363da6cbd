"""The dashboard: server-rendered pages over the same RPCs as ``/api/v1``.

Public pages (the national view, a city, a data centre) need no sign-in; a
voucher, a city's applications, a company's vouchers in every city and a data
centre's own stream need the same token as the API, pasted once at ``/login``
and kept in a signed, HTTP-only session cookie. Charts are drawn by the
vendored Chart.js (``static/vendor/``, no CDN) from JSON embedded in the page;
the national page reloads itself every ``REFRESH_S`` seconds.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from flask import (
    Blueprint,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from nameko.exceptions import RpcTimeout, UnknownService

from gateway import directory
from gateway.auth import COMPANY, Role, authenticate_token
from gateway.companies import company_vouchers, parse_credit_code
from gateway.integrity import integrity_view
from gateway.statements_api import months_since, statement_response
from gateway.vouchers import parse_code
from services.common import vouchercode
from services.common.errors import ComputenetError, Forbidden, NotFound
from services.common.units import format_cny, gpu_hours, month_bounds, utcnow

dashboard = Blueprint("dashboard", __name__)

REFRESH_S = 30
HOURS = 24
SESSION_TOKEN = "token"
# The burn-down reads each program's ledger a page at a time: a ceiling on
# what one page view costs, and on the points the chart draws.
STATEMENT_PAGE = 1000
BURN_DOWN_MAX_ENTRIES = 5000
BURN_DOWN_POINTS = 60
BURN_DOWN_SERIES = ("available", "committed", "redeemed")


def _rpc(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return current_app.extensions["rpc"].call(service, method, *args, **kwargs)


def _signed_in() -> Role | None:
    token = session.get(SESSION_TOKEN)
    return authenticate_token(token) if token else None


@dashboard.app_template_filter("cny")
def _cny(fen: int | None) -> str:
    return "—" if fen is None else format_cny(int(fen))


@dashboard.app_template_filter("gpu_hours")
def _gpu_hours(seconds: int | None) -> str:
    return "—" if seconds is None else f"{gpu_hours(int(seconds)):,.1f}"


@dashboard.app_template_filter("percent")
def _percent(share: float | None) -> str:
    return "—" if share is None else f"{share * 100:.1f} %"


@dashboard.app_context_processor
def _page_globals() -> dict[str, Any]:
    return {"signed_in": _signed_in() if SESSION_TOKEN in session else None}


def _hourly_chart(datacenter_id: str | None = None) -> dict[str, list]:
    """GPU-hours per hour over the last day, of one data centre or (None) of
    the whole network, as the chart's labels (HH:MM) and values: one question
    to metering either way, not one per data centre (a thousand of them
    nationally)."""
    rows = _rpc("metering", "usage_by_hour", datacenter_id, window_hours=HOURS)
    return {
        "labels": [row["hour"][11:16] for row in rows],
        "values": [gpu_hours(row["gpu_seconds"]) for row in rows],
    }


@dashboard.get("/")
def national():
    summary = _rpc("city_registry", "network_summary")
    cities = _rpc("city_registry", "list_cities")
    datacenters = _rpc("city_registry", "list_datacenters")
    hourly = _hourly_chart()
    charts = {
        "budgets": {
            "labels": [c["name"] for c in cities],
            "available": [c.get("available_fen", 0) / 100 for c in cities],
            "committed": [c.get("committed_fen", 0) / 100 for c in cities],
            "redeemed": [c.get("redeemed_fen", 0) / 100 for c in cities],
        },
        "regions": {
            "labels": list(summary.get("regions", {})),
            "utilisation": [
                round((r.get("utilisation") or 0) * 100, 2)
                for r in summary.get("regions", {}).values()
            ],
        },
        "hourly": hourly,
    }
    return render_template(
        "national.html",
        summary=summary,
        cities=cities,
        datacenters=datacenters,
        charts=charts,
        refresh_s=REFRESH_S,
    )


def _program_entries(city: str, program_id: str) -> list[dict]:
    entries: list[dict] = []
    while len(entries) < BURN_DOWN_MAX_ENTRIES:
        statement = _rpc(
            f"vouchers_{city}",
            "program_statement",
            program_id,
            limit=STATEMENT_PAGE,
            offset=len(entries),
        )
        page = (statement or {}).get("entries") or []
        entries += page
        if not page or len(entries) >= (statement or {}).get("total", 0):
            break
    return entries


def _burn_down(city: str, programs: list[dict]) -> dict[str, list] | None:
    """Available, committed and redeemed over time, summed over the city's
    programs, replayed from their ledger entries (``program:<id>:<column>``
    accounts, each entry stamped ``created_at``). None when the city's
    ledger cannot be read now: the rest of the page still shows."""
    try:
        entries = [e for p in programs for e in _program_entries(city, p["id"])]
    except (ComputenetError, RpcTimeout, UnknownService, OSError):
        return None
    entries.sort(key=lambda e: (e.get("created_at") or "", e.get("id") or 0))
    running = dict.fromkeys(BURN_DOWN_SERIES, 0)
    points: list[tuple[str, dict[str, int]]] = []
    for entry in entries:
        column = str(entry.get("account", "")).rsplit(":", 1)[-1]
        if column not in running:
            continue  # released is not drawn: it is a running total of its own
        running[column] += int(entry.get("amount_fen") or 0)
        moment = str(entry.get("created_at") or "")[:16].replace("T", " ")
        if points and points[-1][0] == moment:
            points[-1] = (moment, dict(running))  # one point per minute
        else:
            points.append((moment, dict(running)))
    if len(points) > BURN_DOWN_POINTS:
        step = len(points) / BURN_DOWN_POINTS
        kept = [points[int(i * step)] for i in range(BURN_DOWN_POINTS - 1)]
        points = [*kept, points[-1]]
    chart: dict[str, list] = {"labels": [moment for moment, _ in points]}
    for column in BURN_DOWN_SERIES:
        chart[column] = [totals[column] / 100 for _, totals in points]
    return chart


@dashboard.get("/cities/<city>")
def city_page(city: str):
    found = _rpc("city_registry", "get_city", city)
    role = _signed_in()
    staff = role is not None and (role.is_national_admin or role.is_city_admin(city))
    applications = vouchers = None
    if staff:
        service = f"vouchers_{city}"
        applications = _rpc(service, "list_applications", limit=20, offset=0)
        vouchers = _rpc(service, "list_vouchers", limit=20, offset=0)
    programs = found.get("programs", [])
    charts = {
        "programs": {
            "labels": [p["id"] for p in programs],
            "available": [p.get("available_fen", 0) / 100 for p in programs],
            "committed": [p.get("committed_fen", 0) / 100 for p in programs],
            "redeemed": [p.get("redeemed_fen", 0) / 100 for p in programs],
            "released": [p.get("released_fen", 0) / 100 for p in programs],
        }
    }
    burn_down = _burn_down(city, programs)
    if burn_down and burn_down["labels"]:
        charts["burndown"] = burn_down
    return render_template(
        "city.html",
        city=found,
        staff=staff,
        applications=applications,
        vouchers=vouchers,
        charts=charts,
    )


@dashboard.get("/datacenters/<datacenter_id>")
def datacenter_page(datacenter_id: str):
    dc = _rpc("city_registry", "get_datacenter", datacenter_id)
    hourly = _hourly_chart(datacenter_id)
    role = _signed_in()
    own = role is not None and (
        role.is_national_admin or role.is_datacenter(datacenter_id)
    )
    dead_letters = tenants = None
    if own:
        dead_letters = _rpc(
            "metering", "list_dead_letters", datacenter_id=datacenter_id, limit=20
        )
        tenants = _rpc("metering", "usage_by_tenant", datacenter_id, window_hours=HOURS)
    charts = {"hourly": hourly}
    return render_template(
        "datacenter.html",
        dc=dc,
        own=own,
        dead_letters=dead_letters,
        tenants=tenants,
        charts=charts,
    )


@dashboard.get("/vouchers/<code>")
def voucher_page(code: str):
    role = _signed_in()
    if role is None:
        return redirect(url_for("dashboard.login", next=request.path))
    try:
        prefix = vouchercode.parse(code)
    except vouchercode.InvalidVoucherCode as exc:
        raise NotFound("voucher_not_found", str(exc)) from exc
    code = code.strip().upper()
    city = directory.city_of_prefix(prefix)
    if city is None:
        raise NotFound("voucher_not_found", f"no voucher {code}")
    # A company may hold vouchers of any city: the holder check below decides.
    if not (role.is_national_admin or role.is_city_admin(city) or role.is_company()):
        raise Forbidden("forbidden", f"this voucher belongs to {city}")
    voucher = _rpc(f"vouchers_{city}", "get_voucher", code)
    if role.kind == COMPANY and voucher.get("company_id") != role.company_id:
        raise NotFound("voucher_not_found", f"no voucher {code}")
    redemptions = voucher.get("redemptions", [])
    charts = {
        "balance": {
            "labels": ["balance", "redeemed", "released"],
            "values": [
                voucher.get("balance_fen", 0) / 100,
                voucher.get("redeemed_fen", 0) / 100,
                voucher.get("released_fen", 0) / 100,
            ],
        }
    }
    return render_template(
        "voucher.html",
        voucher=voucher,
        redemptions=redemptions,
        charts=charts,
        months=months_since(voucher["issued_at"], utcnow())
        if voucher.get("issued_at")
        else [],
    )


@dashboard.get("/vouchers/<code>/statements/<month>.<any(pdf, csv):fmt>")
def voucher_statement(code: str, month: str, fmt: str):
    """A month's statement for the signed-in reader of the voucher (the API's
    view and checks: ``gateway/statements_api.py``)."""
    role = _signed_in()
    if role is None:
        return redirect(url_for("dashboard.login", next=request.path))
    parse_code(code)
    month_bounds(month)
    return statement_response(role, code, month, fmt)


@dashboard.get("/companies/<credit_code>")
def company_page(credit_code: str):
    """A company's vouchers in every city (the company itself, national)."""
    role = _signed_in()
    if role is None:
        return redirect(url_for("dashboard.login", next=request.path))
    code = parse_credit_code(credit_code)
    if not (role.is_national_admin or role.is_company(code)):
        raise Forbidden("forbidden", "a company's page is its own")
    found = company_vouchers(code, _rpc("city_registry", "list_cities") or [])
    return render_template("company.html", company_id=code, **found)


@dashboard.get("/integrity")
def integrity_page():
    """Refused and held shares per data centre, the review queues
    (``gateway/integrity.py`` says who sees what)."""
    role = _signed_in()
    if role is None:
        return redirect(url_for("dashboard.login", next=request.path))
    return render_template("integrity.html", view=integrity_view(role))


@dashboard.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        token = (request.form.get("token") or "").strip()
        role = authenticate_token(token) if token else None
        if role is not None:
            session.clear()
            session[SESSION_TOKEN] = token
            target = request.form.get("next") or ""
            if not target and role.kind == COMPANY:
                target = url_for("dashboard.company_page", credit_code=role.company_id)
            return redirect(_same_site(target))
        error = "that token is not valid"
    return render_template(
        "login.html", error=error, next=request.args.get("next", "")
    ), (401 if error else 200)


def _same_site(target: str) -> str:
    """``target`` if it is a path on this site, else the dashboard's home: the
    sign-in page must never be an open redirect.

    Browsers read ``\\`` as ``/`` (``/\\evil.example`` is ``//evil.example``,
    another host) and drop tabs and newlines inside a URL, so a backslash or a
    control character is refused rather than cleaned up; the percent-decoded
    text is held to the same rules, for whatever decodes it once more on the
    way (a proxy, a double-encoded link)."""
    for text in (target, unquote(target)):
        parts = urlsplit(text)
        if (
            not text.startswith("/")
            or text.startswith("//")
            or "\\" in text
            or any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)
            or parts.scheme
            or parts.netloc
        ):
            return url_for("dashboard.national")
    return target


@dashboard.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("dashboard.national"))


@dashboard.errorhandler(ComputenetError)
def _page_error(exc: ComputenetError):
    status = {"Forbidden": 403, "NotFound": 404}.get(type(exc).__name__, 400)
    return render_template("error.html", error=exc), status
