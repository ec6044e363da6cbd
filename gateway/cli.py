"""``computenet``: the national portal from a terminal (click + rich).

Every command but ``rules check`` talks to a running portal over HTTP
(CONTRACTS.md §7). The portal's address and the tokens come from
``var/local-credentials.json`` (CONTRACTS.md §8), which ``make run`` writes;
``--credentials``, ``--portal`` and ``--token`` override them. Output is a
table for people and, with ``--json``, the portal's own JSON for scripts.
A refused request prints one line, ``error: HTTP <status> <code>: <message>``,
on stderr and exits 1.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import requests
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from services.common.units import format_cny, gpu_hours

DEFAULT_CREDENTIALS = Path("var") / "local-credentials.json"
DEFAULT_PORTAL = "http://localhost:8000"
TIMEOUT_S = 30.0
# How the CLI opens HTTP sessions; unit tests replace it with a fake portal.
make_session: Callable[[], Any] = requests.Session


class CliError(click.ClickException):
    """One line on stderr, exit 1."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class PortalError(CliError):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code = status, code
        super().__init__(f"HTTP {status} {code}: {message}")


@dataclass
class Portal:
    """The portal's ``/api/v1``, as plain calls returning decoded JSON."""

    url: str
    token: str | None
    session: Any

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url.rstrip("/") + path
        try:
            response = self.session.request(
                method,
                url,
                json=body,
                params=params,
                headers=headers,
                timeout=TIMEOUT_S,
            )
        except requests.RequestException as exc:
            raise CliError(f"cannot reach the portal at {self.url}: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            if isinstance(data, dict) and "error" in data:
                raise PortalError(
                    response.status_code, data["error"], data.get("message", "")
                )
            text = (response.text or "").strip().splitlines()
            raise PortalError(
                response.status_code, "http_error", text[0] if text else ""
            )
        return data


@dataclass
class Context:
    credentials_path: Path
    portal_url: str | None
    token: str | None
    as_json: bool
    console: Console

    _credentials: dict[str, Any] | None = None

    @property
    def credentials(self) -> dict[str, Any]:
        if self._credentials is None:
            try:
                self._credentials = json.loads(self.credentials_path.read_text())
            except FileNotFoundError:
                self._credentials = {}
            except (OSError, ValueError) as exc:
                raise CliError(f"cannot read {self.credentials_path}: {exc}") from exc
        return self._credentials

    def portal(self, token: str | None = None, *, anonymous: bool = False) -> Portal:
        """A client with ``--token``, else ``token``, else the national admin's."""
        url = self.portal_url or self.credentials.get("portal") or DEFAULT_PORTAL
        chosen = None
        if not anonymous:
            chosen = self.token or token or self.credentials.get("national_admin_token")
        return Portal(url, chosen, make_session())

    def emit(self, data: Any, render: Callable[[Any], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            render(data)


pass_context = click.make_pass_decorator(Context)


def json_option(command: Callable) -> Callable:
    """``--json`` after the command as well as before it."""

    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_object(Context).as_json = True

    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        expose_value=False,
        callback=set_json,
        help="print machine-readable JSON",
    )(command)


# -- formatting -------------------------------------------------------------


def _cny(fen: Any) -> str:
    return "—" if fen is None else format_cny(int(fen))


def _share(value: Any) -> str:
    return "—" if value is None else f"{float(value) * 100:.1f} %"


def _fields_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, "—" if value is None else str(value))
    return table


# -- the commands -----------------------------------------------------------


@click.group()
@click.option(
    "--credentials",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CREDENTIALS,
    show_default=True,
    help="the local run's credentials file (CONTRACTS.md §8)",
)
@click.option("--portal", "portal_url", help="portal URL (default: from credentials)")
@click.option("--token", help="bearer token (default: the role the command needs)")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
@click.version_option(package_name="computenet")
@click.pass_context
def cli(ctx, credentials, portal_url, token, as_json):
    """The computenet national portal from a terminal."""
    ctx.obj = Context(credentials, portal_url, token, as_json, Console())


@cli.group()
def city():
    """Cities of the network."""


@city.command("admit")
@click.argument("code")
@click.argument("name")
@click.option(
    "--voucher-prefix",
    default=None,
    help="the voucher prefix to ask for (2-4 capitals); by default one is derived",
)
@json_option
@pass_context
def city_admit(obj: Context, code: str, name: str, voucher_prefix: str | None):
    """Admit city CODE (national admin); its credentials are shown once, and
    the voucher prefix reserved for it (give it as VOUCHER_PREFIX to its
    vouchers service)."""
    body = {"code": code, "name": name}
    if voucher_prefix:
        body["voucher_prefix"] = voucher_prefix
    admitted = obj.portal().call("POST", "/api/v1/cities", body=body)

    def render(data):
        amqp = data.get("amqp") or {}
        obj.console.print(
            _fields_table(
                f"city {code} admitted",
                [
                    ("voucher prefix", (data.get("city") or {}).get("voucher_prefix")),
                    ("admin token", data.get("admin_token")),
                    ("AMQP user", amqp.get("username")),
                    ("AMQP password", amqp.get("password")),
                ],
            )
        )
        obj.console.print("[yellow]These credentials are shown only once.[/yellow]")

    obj.emit(admitted, render)


@cli.group()
def datacenter():
    """Data centres of the network."""


def _registrations(path: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("datacenters"), list):
        return data["datacenters"]  # deploy/datacenters.yaml's shape
    if isinstance(data, dict):
        return [data]
    raise CliError(f"{path}: expected a data centre mapping or a 'datacenters' list")


@datacenter.command("register")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@pass_context
def datacenter_register(obj: Context, file: Path):
    """Register the data centre(s) of FILE.yaml; their secrets are shown once."""
    portal = obj.portal()
    registered = [
        portal.call("POST", "/api/v1/datacenters", body=registration)
        for registration in _registrations(file)
    ]

    def render(items):
        table = Table(title="registered (secrets are shown only once)")
        for column in ("data centre", "key id", "secret", "AMQP user", "token"):
            table.add_column(column)
        for item in items:
            dc = item.get("datacenter") or {}
            table.add_row(
                dc.get("id"),
                item.get("key_id"),
                item.get("secret"),
                (item.get("amqp") or {}).get("username"),
                item.get("token"),
            )
        obj.console.print(table)

    obj.emit(registered, render)


@cli.group()
def rules():
    """City rules files."""


@rules.command("check")
@click.argument("files", nargs=-1, required=True)
def rules_check(files: tuple[str, ...]):
    """Validate rules FILEs without starting anything (as
    ``python -m services.vouchers.rules check``: same messages, same exit)."""
    from services.vouchers.rules import check_files

    sys.exit(check_files(list(files), out=sys.stdout, err=sys.stderr))


@cli.command("apply")
@click.argument("city_code", metavar="CITY")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@pass_context
def apply(obj: Context, city_code: str, file: Path):
    """Apply to CITY for a voucher with the application in FILE.json."""
    try:
        application = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {file}: {exc}") from exc
    city_token = (obj.credentials.get("cities", {}).get(city_code) or {}).get(
        "admin_token"
    )
    decision = obj.portal(city_token).call(
        "POST", f"/api/v1/cities/{city_code}/applications", body=application
    )

    def render(data):
        table = Table(title=f"{data.get('decision')} ({data.get('application_id')})")
        for column in ("rule", "passed", "evidence"):
            table.add_column(column)
        for reason in data.get("reasons") or []:
            passed = reason.get("passed")
            table.add_row(
                str(reason.get("rule")),
                "[green]yes[/green]" if passed else "[red]no[/red]",
                json.dumps(reason.get("evidence"), ensure_ascii=False),
            )
        obj.console.print(table)
        voucher = data.get("voucher")
        if voucher:
            obj.console.print(
                f"voucher [bold]{voucher['code']}[/bold]: "
                f"{_cny(voucher.get('face_value_fen'))}, "
                f"expires {voucher.get('expires_at')}"
            )
        if data.get("company_token"):  # shown this once: hand it to the company
            obj.console.print(f"company token (shown once): {data['company_token']}")

    obj.emit(decision, render)


@cli.group()
def voucher():
    """Vouchers."""


@voucher.command("show")
@click.argument("code")
@json_option
@pass_context
def voucher_show(obj: Context, code: str):
    """A voucher's balance and every subsidised job."""
    found = obj.portal().call("GET", f"/api/v1/vouchers/{code}")

    def render(v):
        obj.console.print(
            _fields_table(
                f"voucher {v.get('code')}",
                [
                    ("city", v.get("city")),
                    ("program", v.get("program_id")),
                    ("company", v.get("company_id")),
                    ("status", v.get("status")),
                    ("face value", _cny(v.get("face_value_fen"))),
                    ("balance", _cny(v.get("balance_fen"))),
                    ("redeemed", _cny(v.get("redeemed_fen"))),
                    ("released", _cny(v.get("released_fen"))),
                    ("issued", v.get("issued_at")),
                    ("expires", v.get("expires_at")),
                ],
            )
        )
        table = Table(title="redemptions")
        for column in ("record", "data centre", "GPU-hours", "cost", "subsidy"):
            table.add_column(column, justify="right" if column[0].isupper() else None)
        for r in v.get("redemptions") or []:
            table.add_row(
                r.get("record_id"),
                r.get("datacenter_id"),
                f"{gpu_hours(int(r.get('gpu_seconds') or 0)):,.1f}",
                _cny(r.get("cost_fen")),
                _cny(r.get("subsidy_fen")),
            )
        obj.console.print(table)

    obj.emit(found, render)


@cli.command("summary")
@json_option
@pass_context
def summary(obj: Context):
    """The national view: cities, budgets, GPU-hours, utilisation by region."""
    found = obj.portal(anonymous=obj.token is None).call(
        "GET", "/api/v1/network/summary"
    )

    def render(s):
        obj.console.print(
            _fields_table(
                "computenet",
                [
                    ("cities (live)", f"{s.get('cities')} ({s.get('live_cities')})"),
                    ("data centres", s.get("datacenters")),
                    ("budget", _cny(s.get("budget_fen"))),
                    ("committed", _cny(s.get("committed_fen"))),
                    ("redeemed", _cny(s.get("redeemed_fen"))),
                    ("GPU-hours", f"{gpu_hours(int(s.get('gpu_seconds') or 0)):,.1f}"),
                    ("utilisation (24 h)", _share(s.get("utilisation"))),
                ],
            )
        )
        regions = s.get("regions") or {}
        if regions:
            table = Table(title="hub regions")
            for column in ("region", "data centres", "GPU-hours", "utilisation"):
                table.add_column(column)
            for name, region in regions.items():
                table.add_row(
                    name,
                    str(region.get("datacenters", "—")),
                    f"{gpu_hours(int(region.get('gpu_seconds') or 0)):,.1f}",
                    _share(region.get("utilisation")),
                )
            obj.console.print(table)

    obj.emit(found, render)


@cli.command("reconcile")
@json_option
@pass_context
def reconcile(obj: Context):
    """Compare the national read model with every live city's ledger.

    Exits 1 when any drift is found, so that a cron job notices."""
    report = obj.portal().call("POST", "/api/v1/network/reconciliation")

    def render(r):
        table = Table(title=f"reconciliation as of {r.get('as_of')}")
        for column in ("city", "program", "field", "registry", "ledger", "difference"):
            table.add_column(column)
        for d in r.get("drift") or []:
            table.add_row(
                *(
                    str(d.get(k))
                    for k in ("city", "program_id", "field", "registry", "ledger")
                ),
                str(d.get("difference")),
            )
        obj.console.print(table)
        unchecked = [
            city
            for city, state in (r.get("cities") or {}).items()
            if not state.get("checked", True)
        ]
        if unchecked:
            obj.console.print(f"not checked (not live): {', '.join(unchecked)}")
        obj.console.print(
            "[green]no drift[/green]" if r.get("ok") else "[red]drift found[/red]"
        )

    obj.emit(report, render)
    if not report.get("ok"):
        sys.exit(1)


@cli.command("simulate")
@click.option("--datacenter", "datacenter_id", required=True, help="data centre id")
@click.option("--rate", type=float, default=60.0, show_default=True, help="per min")
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--tenant",
    "tenants",
    multiple=True,
    metavar="TENANT=VOUCHER",
    help="default: the local run's demo tenants of this data centre",
)
@click.option("--seed", type=int, default=None)
@json_option
@pass_context
def simulate(obj: Context, datacenter_id, rate, count, tenants, seed):
    """Send COUNT simulated GPU jobs to a data centre's gateway at RATE/min."""
    from services.datacenter_gateway import simulate as sim

    if rate <= 0:
        raise click.BadParameter("must be positive", param_hint="--rate")
    dc = (obj.credentials.get("datacenters") or {}).get(datacenter_id)
    if not dc or not dc.get("gateway_url"):
        raise CliError(
            f"no gateway for data centre {datacenter_id!r} in {obj.credentials_path}"
        )
    chosen = [sim._tenant(t) for t in tenants] or _demo_tenants(obj, datacenter_id)
    client = sim.GatewayClient(dc["gateway_url"], dc.get("agent_token"))
    client.session = make_session()
    give_up = 60.0
    for tenant in chosen:
        if tenant.voucher_code is None:
            continue
        response = client.send(
            "PUT",
            f"/v1/tenants/{tenant.tenant_id}/voucher",
            {"voucher_code": tenant.voucher_code},
            time.monotonic() + give_up,
        )
        _gateway_ok(response, 200, f"voucher of {tenant.tenant_id}")
    status = client.send("GET", "/v1/status", None, time.monotonic() + give_up)
    _gateway_ok(status, 200, "gateway status")
    inventory = (status.json() or {}).get("inventory") or []
    models = {i["gpu_model"]: i["count"] for i in inventory} or {
        m: None for m in sim.DEFAULT_GPU_MODELS
    }
    rng = random.Random(seed)
    per_batch = max(1, round(rate * sim.BATCH_INTERVAL_S / 60.0))
    totals = {"records": 0, "accepted": 0, "duplicates": 0, "gpu_seconds": 0}
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        disable=obj.as_json,
    )
    with progress:
        task = progress.add_task(f"jobs → {datacenter_id}", total=count)
        while totals["records"] < count:
            size = min(per_batch, count - totals["records"])
            batch = [sim.make_job(rng, rng.choice(chosen), models) for _ in range(size)]
            response = client.send(
                "POST", "/v1/usage", batch, time.monotonic() + give_up
            )
            _gateway_ok(response, 202, "usage batch")
            result = response.json()
            totals["records"] += size
            totals["accepted"] += int(result.get("accepted", 0))
            totals["duplicates"] += int(result.get("duplicates", 0))
            totals["gpu_seconds"] += sum(r["gpu_seconds"] for r in batch)
            progress.advance(task, size)
            if totals["records"] < count:
                time.sleep(size * 60.0 / rate)

    obj.emit(
        totals | {"datacenter_id": datacenter_id},
        lambda t: obj.console.print(
            f"{t['records']} jobs sent to {datacenter_id}: {t['accepted']} accepted, "
            f"{t['duplicates']} duplicates, "
            f"{gpu_hours(t['gpu_seconds']):,.1f} GPU-hours"
        ),
    )


def _demo_tenants(obj: Context, datacenter_id: str) -> list:
    from deploy.demo import DEMO_TENANTS, VOUCHERLESS_TENANT
    from services.datacenter_gateway.simulate import Tenant

    vouchers = obj.credentials.get("demo_vouchers") or {}
    tenants = [
        Tenant(t, vouchers[t])
        for t in DEMO_TENANTS.get(datacenter_id, [])
        if t in vouchers
    ]
    return tenants or [Tenant(VOUCHERLESS_TENANT, None)]


def _gateway_ok(response, expected: int, what: str) -> None:
    if response.status_code != expected:
        text = (response.text or "").strip().splitlines()
        raise CliError(
            f"{what}: gateway answered HTTP {response.status_code}: "
            f"{text[0] if text else ''}"
        )


# Command groups kept in their own modules register themselves on ``cli``.
from gateway import cli_parked  # noqa: E402, F401


def main() -> None:
    try:
        cli(prog_name="computenet")
    except TimeoutError as exc:  # the simulator's "gateway unreachable"
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
