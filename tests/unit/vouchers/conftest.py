"""Fixtures of the voucher service's unit tests: a small city and its ledger
(the data itself is tests/support/vouchers_data.py)."""

import pytest

from services.vouchers import domain, ledger
from services.vouchers.rules import parse_rules
from tests.support.vouchers_data import (
    CITY_RULES,
    company,
    make_session_factory,
    usage,
)


@pytest.fixture
def city_rules() -> domain.CityRules:
    return parse_rules(CITY_RULES, "testcity.yaml")


@pytest.fixture
def session_factory():
    engine, factory = make_session_factory()
    yield factory
    engine.dispose()


@pytest.fixture
def books(session_factory, city_rules):
    """A session on the test city's books, its programs funded."""
    session = session_factory()
    ledger.sync_programs(session, city_rules)
    yield session
    session.close()


@pytest.fixture
def make_company():
    return company


@pytest.fixture
def make_usage():
    return usage
