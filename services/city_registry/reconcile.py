"""``python -m services.city_registry.reconcile``: is the national view the sum
of the cities' ledgers (DESIGN.md §5, invariant 5)?

Asks the running registry to reconcile (it asks every live city for
``ledger_totals``) and prints one line per city and one per drift; exits 0 when
there is none, 1 when figures drift or a live city did not answer.
``--rebuild [CITY]`` first resets the read model from the cities' ledgers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from services.common.rpc import RpcPool

DEFAULT_AMQP_URI = "amqp://guest:guest@localhost:5672/"


def format_report(report: dict) -> list[str]:
    lines = []
    for code, entry in sorted(report["cities"].items()):
        if not entry.get("checked"):
            why = entry.get("error") or "not live, not asked"
            lines.append(f"{code}: {entry['status']}, unchecked ({why})")
        else:
            lines.append(f"{code}: {entry['drift']} drift(s)")
    for d in report["drift"]:
        where = d["city"] + (f"/{d['program_id']}" if d["program_id"] else "")
        lines.append(
            f"DRIFT {where} {d['field']}: registry {d['registry']} "
            f"≠ ledger {d['ledger']} ({d['difference']:+d})"
        )
    lines.append("reconciled: " + ("ok" if report["ok"] else "DRIFT"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.city_registry.reconcile")
    parser.add_argument(
        "--amqp-uri", default=os.environ.get("AMQP_URI", DEFAULT_AMQP_URI)
    )
    parser.add_argument("--json", action="store_true", help="print the raw report")
    parser.add_argument(
        "--rebuild",
        nargs="?",
        const="*",
        metavar="CITY",
        help="rebuild the read model (of CITY, or every live city) first",
    )
    args = parser.parse_args(argv)
    pool = RpcPool(args.amqp_uri, size=1, timeout=60)
    try:
        if args.rebuild:
            city = None if args.rebuild == "*" else args.rebuild
            rebuilt = pool.call("city_registry", "rebuild_read_model", city)
            print(f"rebuilt: {', '.join(rebuilt['rebuilt']) or 'nothing'}")
        report = pool.call("city_registry", "reconcile")
    finally:
        pool.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(format_report(report)))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
