"""Test data for a city's voucher service (its unit and integration tests, the
bench): a small test city's rules, data centres, companies, applications and
``usage_rated`` events, with overrides; the books on an in-memory SQLite.

``usage_rated`` comes in two forms from one set of fields: :func:`usage` is
the event as the ledger receives it (loaded: datetimes), :func:`rated` as
metering publishes it (dumped by the event's schema, ready for the bus).
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from services.common import creditcode
from services.common.amqp import FEDERATION_EXCHANGE, federation_key
from services.common.contracts import make_event
from services.common.units import utcnow
from services.vouchers.models import Base

# The test city, as its rules file opens; the programs follow.
RULES_HEADER = """\
city: testcity
name: Test City
region: east
voucher_prefix: TC
programs:
"""
# The cities' rules files a deployment starts from.
DEPLOY_CITIES = Path(__file__).resolve().parents[2] / "deploy" / "cities"

# Shanghai with one auto-approved compute program, for the rings that run a
# city's service as it is deployed (vouchers_shanghai).
SHANGHAI_RULES = """\
city: shanghai
name: Shanghai
region: east
voucher_prefix: SH
programs:
  - id: sh-compute-2025
    kind: compute
    budget_cny: 10000000
    rate_percent: 80
    max_rate_percent: 90
    face_value_cny: {min: 1000, max: 2000000}
    valid_days: 365
    review: auto
    eligibility:
      all_of:
        - registered_in: shanghai
"""

# The smallest valid rules file of the test city: one program.
MINIMAL_RULES = (
    RULES_HEADER
    + """\
  - id: tc-compute
    kind: compute
    budget_cny: 1000000
    rate_percent: 80
    max_rate_percent: 90
    face_value_cny: {min: 1000, max: 100000}
    valid_days: 365
    review: auto
    eligibility:
      all_of:
        - registered_in: testcity
    datacenters: any
"""
)

# The unit tests' city: three programs (one auto-approved with bonuses, one
# for western data centres, one reviewed by hand for data centre dc-a).
CITY_RULES = (
    "\n"
    + RULES_HEADER
    + """\
  - id: tc-compute
    kind: compute
    budget_cny: 10000
    rate_percent: 80
    max_rate_percent: 90
    face_value_cny: {min: 100, max: 1000}
    valid_days: 30
    review: auto
    eligibility:
      all_of:
        - registered_in: testcity
        - max_employees: 300
        - any_of:
            - min_annual_revenue_cny: 5000000
            - government_research_project: true
    bonuses:
      - when: {government_run: true}
        add_percent: 10
      - when: {chip_origin: domestic}
        add_percent: 5
    datacenters: any
  - id: tc-west
    kind: compute
    budget_cny: 5000
    rate_percent: 50
    face_value_cny: {min: 100, max: 1000}
    valid_days: 30
    review: auto
    datacenters: {hub_region: west}
  - id: tc-manual
    kind: training_data
    budget_cny: 5000
    rate_percent: 50
    face_value_cny: {min: 100, max: 1000}
    valid_days: 30
    review: manual
    datacenters: [dc-a]
"""
).encode()

# The data centre a usage_rated event carries, as the bonuses and scopes see it.
EAST_COMMERCIAL = {
    "government_run": False,
    "hub_region": "east",
    "chip_origin": "imported",
}
WEST_GOVERNMENT = {
    "government_run": True,
    "hub_region": "west",
    "chip_origin": "domestic",
}

_ids = itertools.count(1)


def company(**overrides: Any) -> dict[str, Any]:
    """A company of the test city that the tc-compute rules admit."""
    body = {
        "registration_id": credit_code(next(_ids)),
        "name": "Deep Thought AI",
        "registered_in": "testcity",
        "employees": 40,
        "annual_revenue_cny": 8_000_000,
        "government_research_project": False,
    }
    body.update(overrides)
    return body


def credit_code(n: int, division: str = "310000") -> str:
    """The ``n``-th well-formed unified social credit code of a company in
    ``division`` (Shanghai's by default): distinct for distinct ``n``."""
    return creditcode.complete(f"91{division}{n:09d}")


def application(
    program_id: str = "sh-compute-2025",
    requested_face_value_cny: int = 1_000_000,
    **company_fields: Any,
) -> dict[str, Any]:
    """An application, as the portal sends it, by a Shanghai start-up that
    ``deploy/cities/shanghai.yaml`` admits (fields of ``company`` overridden)."""
    applicant = {
        "registered_in": "shanghai",
        "employees": 42,
        "annual_revenue_cny": 9_000_000,
        **company_fields,
    }
    return {
        "program_id": program_id,
        "company": company(**applicant),
        "requested_face_value_cny": requested_face_value_cny,
    }


def _usage_fields(
    voucher_code: str | None,
    cost_fen: int,
    datacenter: dict | None,
    started_at: datetime,
) -> dict[str, Any]:
    return {
        "datacenter_id": "dc-a",
        "tenant_id": "tenant-1",
        "voucher_code": voucher_code,
        "gpu_model": "H800",
        "gpu_count": 1,
        "started_at": started_at,
        "ended_at": started_at + timedelta(hours=1),
        "gpu_seconds": 3600,
        "source": "slurm",
        "job_id": None,
        "correction_of": None,
        "cost_fen": cost_fen,
        "unit_price_fen_per_gpu_hour": cost_fen,
        "datacenter": dict(datacenter or EAST_COMMERCIAL),
    }


def usage(
    voucher_code: str | None,
    cost_fen: int,
    datacenter: dict | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A loaded ``usage_rated`` event of an hour on one GPU, two hours ago."""
    record = {
        "event_id": f"ev-{next(_ids)}",
        "record_id": f"rec-{next(_ids)}",
        **_usage_fields(
            voucher_code, cost_fen, datacenter, utcnow() - timedelta(hours=2)
        ),
    }
    record.update(overrides)
    return record


def rated(
    voucher_code: str | None,
    record_id: str,
    cost_fen: int,
    datacenter: dict,
    *,
    city: str = "shanghai",
    event_id: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """``<city>.usage_rated`` as metering publishes it: an hour on one GPU
    that ended a minute ago (event id ``rated-<record_id>`` unless given)."""
    started_at = utcnow() - timedelta(minutes=1, hours=1)
    fields = _usage_fields(voucher_code, cost_fen, datacenter, started_at)
    fields.update(record_id=record_id, datacenter_id="dc-test-01")
    fields.update(overrides)
    return make_event("usage_rated", city, event_id or f"rated-{record_id}", **fields)


def publish_usage_rated(
    connection, *bodies: dict[str, Any], city: str = "shanghai", **properties: Any
) -> None:
    """Publish ``bodies`` (:func:`rated`) as ``<city>.usage_rated`` on
    ``computenet.federation``, persistent, as metering does."""
    producer = connection.Producer()
    for body in bodies:
        producer.publish(
            body,
            exchange=FEDERATION_EXCHANGE,
            routing_key=federation_key(city, "usage_rated"),
            serializer="json",
            delivery_mode=2,
            **properties,
        )


def make_session_factory():
    """``(engine, sessionmaker)`` of a fresh in-memory SQLite with the vouchers
    schema, shared by every thread of the test."""
    engine = create_engine(
        "sqlite://",
        connect_args={"check_same_thread": False},
        poolclass=StaticPool,
    )
    Base.metadata.create_all(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)
