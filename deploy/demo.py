"""The local run's demo data (``make run``): the companies that apply, the
tenants that spend their vouchers, and the companies' portal tokens.

``deploy/localnet.py`` calls these once the cities are up; a second run keeps
what the first issued (the vouchers the cities still know, the tokens the
registry still accepts), from the previous ``var/local-credentials.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.common import creditcode

# Demo companies, one or two per city, whose vouchers the simulated tenants
# spend. Facts chosen to pass each preset's eligibility rules.
DEMO_COMPANIES: dict[str, list[dict[str, Any]]] = {
    "shanghai": [
        {
            "program_id": "sh-compute-2025",
            "tenant": "aurora-ai",
            "company": {
                "registration_id": "91310000MA1DEM001X",
                "name": "Aurora AI (demo)",
                "registered_in": "shanghai",
                "employees": 85,
                "annual_revenue_cny": 12000000,
                "government_research_project": False,
                "founded_on": "2021-03-15",
                "sector": "foundation_models",
            },
            "requested_face_value_cny": 1500000,
        },
        {
            "program_id": "sh-compute-2025",
            "tenant": "huangpu-vision",
            "company": {
                "registration_id": "91310000MA1DEM0021",
                "name": "Huangpu Vision (demo)",
                "registered_in": "shanghai",
                "employees": 40,
                "annual_revenue_cny": 6000000,
                "government_research_project": False,
                "founded_on": "2022-09-01",
                "sector": "computer_vision",
            },
            "requested_face_value_cny": 1000000,
        },
    ],
    "chengdu": [
        {
            "program_id": "cd-research-2023",
            "tenant": "tianfu-lab",
            "company": {
                "registration_id": "91510100MA1DEM001G",
                "name": "Tianfu Language Lab (demo)",
                "registered_in": "chengdu",
                "employees": 60,
                "annual_revenue_cny": 3000000,
                "government_research_project": True,
                "founded_on": "2019-05-20",
                "sector": "research_institute",
            },
            "requested_face_value_cny": 1200000,
        }
    ],
    "shandong": [
        {
            "program_id": "sd-compute-2024",
            "tenant": "qilu-robotics",
            "company": {
                "registration_id": "91370000MA1DEM001N",
                "name": "Qilu Robotics (demo)",
                "registered_in": "shandong",
                "employees": 150,
                "annual_revenue_cny": 20000000,
                "government_research_project": False,
                "founded_on": "2018-11-11",
                "sector": "robotics",
            },
            "requested_face_value_cny": 1000000,
        }
    ],
}
# Which tenants each data centre's simulated agent runs jobs for.
DEMO_TENANTS = {
    "guian-gov-01": ["aurora-ai", "tianfu-lab", "qilu-robotics"],
    "lingang-com-01": ["huangpu-vision", "aurora-ai"],
}
VOUCHERLESS_TENANT = "metered-only-corp"


def issue_demo_vouchers(
    rpc: Any,
    cities: tuple[str, ...],
    previous: dict[str, str],
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """tenant → its voucher (``code``, ``company_id``): the previous run's
    when its city still has it, else a new application's."""
    from services.common.errors import Conflict, NotFound

    vouchers: dict[str, dict[str, Any]] = {}
    for city in cities:
        for demo in DEMO_COMPANIES.get(city, []):
            tenant = demo["tenant"]
            code = previous.get(tenant)
            if code:
                try:
                    vouchers[tenant] = rpc.call(f"vouchers_{city}", "get_voucher", code)
                    continue
                except NotFound:
                    pass
            application = {k: v for k, v in demo.items() if k != "tenant"}
            try:
                result = rpc.call(f"vouchers_{city}", "apply", application)
            except Conflict as exc:
                # The city's database outlived the credentials file: apply
                # under a fresh registration id rather than give up.
                log(f"demo voucher for {tenant}: {exc}; applying as a new company")
                application["company"] = dict(
                    application["company"],
                    registration_id=creditcode.generate(
                        application["company"]["registration_id"][2:8]
                    ),
                )
                result = rpc.call(f"vouchers_{city}", "apply", application)
            if result.get("voucher"):
                vouchers[tenant] = result["voucher"]
            else:
                log(f"demo application for {tenant} was {result.get('decision')}")
    return vouchers


def company_tokens(
    rpc: Any,
    vouchers: dict[str, dict[str, Any]],
    previous: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """``{credit code: {"token", "vouchers": [codes]}}`` of every company
    holding a demo voucher. The demo applies to the cities directly, not
    through the portal, so no answer brought a token: the previous run's is
    kept while the registry accepts it, else one is re-issued (revoking any
    the registry holds for the company, which nobody here knows)."""
    held: dict[str, list[str]] = {}
    for voucher in vouchers.values():
        held.setdefault(voucher["company_id"], []).append(voucher["code"])
    companies = {}
    for company_id, codes in sorted(held.items()):
        token = (previous.get(company_id) or {}).get("token")
        known = token and rpc.call("city_registry", "authenticate", token)
        if not (known and known.get("role") == f"company:{company_id}"):
            issued = rpc.call("city_registry", "reissue_company_token", company_id)
            token = issued["token"]
        companies[company_id] = {"token": token, "vouchers": sorted(codes)}
    return companies


def authorise_demo_tenants(
    rpc: Any,
    vouchers: dict[str, dict[str, Any]],
    datacenters: list[str] | tuple,
    log: Callable[[str], None],
) -> None:
    """Each demo company authorises its tenant at every data centre of the
    run that hosts it (DESIGN.md §9: a voucher pays only for tenants its
    holder authorised, and only for jobs that started afterwards; the
    simulated agents start after this). A second run's call leaves the
    first authorisation as it was. A voucher no longer active (spent,
    expired) is logged and left: its tenant's records are refused."""
    from services.common.errors import Conflict

    for datacenter_id in datacenters:
        for tenant in DEMO_TENANTS.get(datacenter_id, []):
            voucher = vouchers.get(tenant)
            if voucher is None:
                continue
            try:
                rpc.call(
                    f"vouchers_{voucher['city']}",
                    "authorise_binding",
                    voucher["code"],
                    datacenter_id,
                    tenant,
                    f"company:{voucher['company_id']}",
                )
            except Conflict as exc:
                log(f"demo tenant {tenant} at {datacenter_id} not authorised: {exc}")
