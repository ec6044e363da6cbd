"""Fixtures of the voucher service's unit tests: a small city and its ledger."""

import itertools
from datetime import timedelta

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from services.common.units import utcnow
from services.vouchers import domain
from services.vouchers.models import Base
from services.vouchers.rules import parse_rules

CITY_RULES = b"""
city: testcity
name: Test City
region: east
voucher_prefix: TC
programs:
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


@pytest.fixture
def city_rules() -> domain.CityRules:
    return parse_rules(CITY_RULES, "testcity.yaml")


def make_session_factory():
    engine = create_engine(
        "sqlite://",
        connect_args={"check_same_thread": False},
        poolclass=StaticPool,
    )
    Base.metadata.create_all(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def session_factory():
    engine, factory = make_session_factory()
    yield factory
    engine.dispose()


_ids = itertools.count(1)


def company(**overrides):
    body = {
        "registration_id": f"91310000MA{next(_ids):08d}",
        "name": "Deep Thought AI",
        "registered_in": "testcity",
        "employees": 40,
        "annual_revenue_cny": 8_000_000,
        "government_research_project": False,
    }
    body.update(overrides)
    return body


def usage(voucher_code, cost_fen, datacenter=None, **overrides):
    started = utcnow() - timedelta(hours=2)
    record = {
        "event_id": f"ev-{next(_ids)}",
        "record_id": f"rec-{next(_ids)}",
        "datacenter_id": "dc-a",
        "tenant_id": "tenant-1",
        "voucher_code": voucher_code,
        "gpu_model": "H800",
        "gpu_count": 1,
        "started_at": started,
        "ended_at": started + timedelta(hours=1),
        "gpu_seconds": 3600,
        "source": "slurm",
        "job_id": None,
        "correction_of": None,
        "cost_fen": cost_fen,
        "unit_price_fen_per_gpu_hour": cost_fen,
        "datacenter": dict(datacenter or EAST_COMMERCIAL),
    }
    record.update(overrides)
    return record


@pytest.fixture
def make_company():
    return company


@pytest.fixture
def make_usage():
    return usage
