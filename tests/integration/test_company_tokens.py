"""Companies' first tokens against the real registry on PostgreSQL: one token
however many first vouchers are issued at once, and it authenticates as the
company; a re-issue replaces it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from nameko.standalone.rpc import ServiceRpcClient
from sqlalchemy.orm import Session

from services.city_registry.domain import tokens
from services.city_registry.service import CityRegistryService
from services.city_registry.store import RegistryStore
from services.common.config import DATABASE_URL
from services.common.db import make_engine
from services.common.errors import InvalidRequest
from services.common.migrations import upgrade
from services.common.rpc_access import caller_options
from tests.support.vouchers_data import credit_code

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def registry_url(pg_url_factory):
    url = pg_url_factory("city_registry")
    upgrade("city_registry", url)
    return url


@pytest.fixture
def registry_rpc(rabbit_config, registry_url, container_factory):
    container = container_factory(CityRegistryService, {DATABASE_URL: registry_url})
    container.start()
    with ServiceRpcClient("city_registry", timeout=10, **caller_options()) as client:
        yield client


def test_the_first_token_once_then_none_and_a_reissue_replaces_it(registry_rpc):
    code = credit_code(4242)

    first = registry_rpc.issue_company_token(code)

    assert first["role"] == f"company:{code}"
    assert registry_rpc.authenticate(first["token"]) == {"role": f"company:{code}"}
    assert registry_rpc.issue_company_token(code) is None
    again = registry_rpc.reissue_company_token(code)
    assert again["revoked_tokens"] == 1
    assert registry_rpc.authenticate(first["token"]) is None
    assert registry_rpc.authenticate(again["token"]) == {"role": f"company:{code}"}
    assert registry_rpc.issue_company_token(code) is None
    with pytest.raises(InvalidRequest) as info:
        registry_rpc.issue_company_token(code[:17] + ("0" if code[17] != "0" else "1"))
    assert info.value.code == "invalid_credit_code"


def test_first_tokens_issued_at_once_store_one(registry_url):
    """Eight sessions (as eight registry workers or copies would) ask at the
    same moment, many times over: each time exactly one stores a token."""
    engine = make_engine(registry_url, pool_size=8)
    try:
        for round_ in range(10):
            role = f"company:{credit_code(round_)}"
            barrier = threading.Barrier(8)
            outcomes: list[bool] = []

            def race(n, role=role, barrier=barrier, outcomes=outcomes):
                with Session(engine, expire_on_commit=False) as session:
                    store = RegistryStore(session)
                    barrier.wait()
                    outcomes.append(
                        store.add_first_token(
                            tokens.token_digest(f"{role}-{n}"),
                            role,
                            NOW,
                            token_id=tokens.new_token_id(),
                        )
                    )

            threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            with Session(engine) as session:
                _, total = RegistryStore(session).tokens(role)
            assert (sorted(outcomes), total) == ([False] * 7 + [True], 1)
    finally:
        engine.dispose()
