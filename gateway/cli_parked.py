"""``computenet parked``: the events a consumer set aside (``list``,
``replay <id>``), over the portal's ``/api/v1/parked-events``; ``--service``
registry (the default), metering or a city code. Registered on the
``computenet`` group by ``gateway/cli.py``."""

from __future__ import annotations

import click
from rich.table import Table

from gateway.cli import Context, cli, json_option, pass_context

SERVICE_HELP = "registry (default), metering, or a city code"


def _service_option(command):
    return click.option(
        "--service", default="registry", show_default=True, help=SERVICE_HELP
    )(command)


@cli.group()
def parked():
    """Events a consumer could not apply (issue 16)."""


@parked.command("list")
@click.option("--kind", type=click.Choice(["rejected", "failed"]))
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@_service_option
@json_option
@pass_context
def list_parked(obj: Context, kind: str | None, limit: int, service: str):
    """Newest first, with each one's reason and what a replay came to."""
    params = {"limit": limit, "service": service, **({"kind": kind} if kind else {})}
    found = obj.portal().call("GET", "/api/v1/parked-events", params=params)

    def render(data):
        table = Table(title=f"parked events of {service} ({data['total']})")
        for column in ("id", "parked at", "kind", "routing key", "attempts", "reason"):
            table.add_column(column)
        table.add_column("replay")
        for item in data["items"]:
            table.add_row(
                str(item["id"]),
                item["parked_at"],
                item["kind"],
                item["routing_key"],
                str(item["attempts"]),
                item["reason"][:120],
                item.get("outcome") or "",
            )
        obj.console.print(table)

    obj.emit(found, render)


@parked.command("replay")
@click.argument("parked_id", type=int)
@_service_option
@json_option
@pass_context
def replay_parked(obj: Context, parked_id: int, service: str):
    """Apply one again, once its cause is fixed; exits 1 if it still fails."""
    result = obj.portal().call(
        "POST",
        f"/api/v1/parked-events/{parked_id}/replay",
        params={"service": service},
    )
    obj.emit(
        result,
        lambda r: obj.console.print(
            f"parked event {r['id']} of {service}: {r['outcome']}"
            + (f" ({r['reason']})" if r.get("reason") else "")
        ),
    )
    if result["outcome"] == "parked_again":
        raise SystemExit(1)
