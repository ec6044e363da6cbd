"""The entrypoints, through nameko's worker_factory: no broker, SQLite store."""

import json
import time
from datetime import UTC, datetime, timedelta
from unittest.mock import Mock, patch

import pytest
from eventlet.semaphore import Semaphore
from nameko.exceptions import UnknownService
from nameko.testing.services import worker_factory
from sqlalchemy.orm import Session

from services.city_registry.dependencies import Prefixes, ViewCache
from services.city_registry.domain import tokens
from services.city_registry.service import CityRegistryService
from services.city_registry.store import RegistryStore
from services.common import creditcode
from services.common.amqp import RawMessage
from services.common.contracts import make_event
from services.common.db import make_engine
from services.common.errors import InvalidRequest, NotFound
from services.common.migrations import upgrade
from services.common.vouchercode import generate
from tests.support.federation_data import program

NOW = datetime(2025, 6, 1, tzinfo=UTC)
C1, C2 = (
    creditcode.complete("91310000MA1QA0001"),
    creditcode.complete("91310000MA1QA0002"),
)


@pytest.fixture
def store(sqlite_url):
    upgrade("city_registry", sqlite_url)
    engine = make_engine(sqlite_url)
    with Session(engine, expire_on_commit=False) as session:
        yield RegistryStore(session)
    engine.dispose()


@pytest.fixture
def metering():
    return Mock()


@pytest.fixture
def service(store, metering):
    # A cache and a lock of its own, as each container gets (dependencies.py).
    return worker_factory(
        CityRegistryService,
        store=store,
        metering_rpc=metering,
        view_cache=ViewCache(),
        projection_lock=Semaphore(1),
        reserved_prefixes=Prefixes(),
    )


def _message(routing_key, body):
    return RawMessage(json.dumps(body).encode(), {}, {}, routing_key, False)


def _heartbeat(city, eid):
    return make_event("heartbeat", city, eid, version="1", uptime_s=3)


def test_federation_event_is_projected(service):
    service.handle_federation_event(
        _message("shanghai.heartbeat", _heartbeat("shanghai", "h1"))
    )
    assert service.get_city("shanghai")["status"] == "live"


def test_event_of_another_city_is_dropped(service):
    service.handle_federation_event(
        _message("shanghai.heartbeat", _heartbeat("chengdu", "h1"))
    )
    assert service.list_cities() == []


def _published(city, eid, **extra):
    programs = [program(city, 100, id=f"{city}-p", rules_sha256="d" * 64)]
    return make_event("program_published", city, eid, programs=programs, **extra)


def _issued(city, eid, code):
    return make_event(
        "voucher_issued",
        city,
        eid,
        voucher_code=code,
        program_id=f"{city}-p",
        face_value_fen=40,
        expires_at="2030-01-01T00:00:00Z",
    )


def test_a_city_claiming_another_citys_prefix_is_refused(service, store):
    store.admit_city("shanghai", "Shanghai", NOW, "SH")
    store.admit_city("squatter", "Squatter", NOW, "SQ")
    for key, body in (
        ("program_published", _published("squatter", "p1", voucher_prefix="SH")),
        ("voucher_issued", _issued("squatter", "i1", generate("SH"))),
        ("voucher_issued", _issued("squatter", "i2", "SQ-not-a-code")),
    ):
        service.handle_federation_event(_message(f"squatter.{key}", body))
    squatter = service.get_city("squatter")
    assert squatter["programs"] == [] and squatter["committed_fen"] == 0
    assert service.voucher_prefixes() == {"SH": "shanghai", "SQ": "squatter"}


def test_a_city_publishing_its_own_prefix_is_projected(service, store):
    store.admit_city("shanghai", "Shanghai", NOW, "SH")
    for key, body in (
        ("program_published", _published("shanghai", "p1", voucher_prefix="SH")),
        ("voucher_issued", _issued("shanghai", "i1", generate("SH"))),
    ):
        service.handle_federation_event(_message(f"shanghai.{key}", body))
    city = service.get_city("shanghai")
    assert city["budget_fen"] == 100 and city["committed_fen"] == 40


def test_a_city_without_a_prefix_issues_nothing(service):
    body = _issued("nowhere", "i1", generate("NW"))
    service.handle_federation_event(_message("nowhere.voucher_issued", body))
    assert service.list_cities() == []


def test_admission_answers_the_reserved_prefix(service):
    service.broker = Mock()
    admitted = service.admit_city("ningbo", "Ningbo", voucher_prefix="NBO")
    assert admitted["city"]["voucher_prefix"] == "NBO"
    other = service.admit_city("ningde", "Ningde", voucher_prefix="NBO")
    assert other["city"]["voucher_prefix"] not in (None, "NBO")
    assert service.get_city("ningbo")["voucher_prefix"] == "NBO"
    with pytest.raises(InvalidRequest) as info:
        service.admit_city("nanning", "Nanning", voucher_prefix="nb1")
    assert info.value.code == "invalid_voucher_prefix"


def test_same_event_id_from_two_cities_counts_for_both(service):
    for city in ("shanghai", "chengdu"):
        body = make_event(
            "program_published",
            city,
            "same-id",
            programs=[
                program(city, 100, id=f"{city}-p", rate_bp=5000, rules_sha256="d" * 64)
            ],
        )
        service.handle_federation_event(_message(f"{city}.program_published", body))
    assert [c["budget_fen"] for c in service.list_cities()] == [100, 100]


@pytest.mark.parametrize(
    "failure", [UnknownService("metering"), ConnectionError("broker gone")]
)
def test_summary_survives_metering_failure(service, metering, failure):
    metering.usage_overview.side_effect = failure
    summary = service.network_summary()
    assert summary["gpu_seconds"] is None and summary["utilisation"] is None
    assert summary["budget_fen"] == 0


def test_summary_uses_the_24_hour_window(service, metering):
    metering.usage_overview.return_value = {"datacenters": {}}
    assert service.network_summary()["gpu_seconds"] == 0
    metering.usage_overview.assert_called_once_with(window_hours=24)


def test_public_view_lists_every_city_beside_the_summary(service, metering):
    metering.usage_overview.return_value = {"datacenters": {}}
    view = service.public_view()
    assert view["summary"] == service.network_summary()
    assert [c["code"] for c in view["cities"]] == [
        c["code"] for c in service.list_cities()
    ]


def test_metering_is_asked_once_for_every_view_in_a_while(service, metering):
    metering.usage_overview.return_value = {"datacenters": {}}
    service.network_summary()
    service.public_view()
    service.list_datacenters()
    metering.usage_overview.assert_called_once_with(window_hours=24)


def test_a_week_of_usage_is_kept_longer_than_a_day(service, metering):
    from services.city_registry import service as module

    metering.usage_overview.return_value = {"datacenters": {}}
    service.national_overview()
    day, _ = service.view_cache.entry("usage:24")
    week, _ = service.view_cache.entry("usage:168")
    assert week - day >= 6 * module.USAGE_CACHE_S - 1


def test_a_week_of_figures_may_take_longer_but_not_past_the_portal():
    from services.city_registry.service import metering_timeout_s

    assert metering_timeout_s(24) == 3.0
    assert metering_timeout_s(48) == 6.0
    assert metering_timeout_s(7 * 24) == 8.0  # the portal gives up at 10 s


def test_a_failed_metering_answer_is_kept_only_briefly(service, metering):
    from services.city_registry import service as module

    metering.usage_overview.side_effect = ConnectionError("broker gone")
    assert service.network_summary()["gpu_seconds"] is None
    expires, answer = service.view_cache.entry("usage:24")
    assert answer is None
    assert expires - time.monotonic() <= module.VIEW_CACHE_S < module.USAGE_CACHE_S


def test_unknown_city_and_datacenter(service):
    with pytest.raises(NotFound) as info:
        service.get_city("atlantis")
    assert info.value.code == "city_not_found"
    with pytest.raises(NotFound) as info:
        service.get_datacenter("nowhere")
    assert info.value.code == "datacenter_not_found"
    with pytest.raises(NotFound):
        service.datacenter_signing_keys("nowhere")


def test_token_round_trip(service):
    token = service.issue_token("city_admin:shanghai")
    assert service.authenticate(token) == {"role": "city_admin:shanghai"}
    assert service.authenticate(None) is None
    assert service.authenticate("") is None
    with pytest.raises(InvalidRequest):
        service.issue_token("city_admin:")


# -- tokens: expiry, listing, revocation ----------------------------------------

NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def _at(moment):
    return patch("services.city_registry.service.utcnow", return_value=moment)


def test_an_issued_token_expires(service):
    with _at(NOW):
        token = service.issue_token("city_admin:shanghai", ttl_days=2)
    with _at(NOW + timedelta(days=2) - timedelta(seconds=1)):
        assert service.authenticate(token) == {"role": "city_admin:shanghai"}
    with _at(NOW + timedelta(days=2)):
        assert service.authenticate(token) is None


def test_the_default_expiry_comes_from_the_config(service):
    with _at(NOW), patch.dict("nameko.config", {"TOKEN_TTL_DAYS": 0}):
        forever = service.issue_token("national_admin")
    with _at(NOW):
        default = service.issue_token("national_admin")
    listed = {item["expires_at"] for item in service.list_tokens()["items"]}
    assert listed == {None, "2026-05-30T08:00:00Z"}
    with _at(NOW + timedelta(days=3650)):
        assert service.authenticate(forever) == {"role": "national_admin"}
        assert service.authenticate(default) is None


def test_tokens_are_listed_by_id_never_by_secret(service):
    with _at(NOW):
        token = service.issue_token(f"company:{C1}")
        service.issue_token(f"company:{C2}")
        service.authenticate(token)
        listed = service.list_tokens(role=f"company:{C1}")
    assert listed["total"] == 1
    (item,) = listed["items"]
    assert set(item) == {
        "id",
        "role",
        "status",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    }
    assert tokens.TOKEN_ID.match(item["id"])
    assert item["status"] == "active"
    assert item["last_used_at"] == "2026-03-01T08:00:00Z"
    text = repr(service.list_tokens())
    assert token not in text and tokens.token_digest(token) not in text
    with pytest.raises(InvalidRequest):
        service.list_tokens(role="superuser")


def test_one_token_is_revoked_and_only_within_a_role(service):
    with _at(NOW):
        kept = service.issue_token("city_admin:shanghai")
        gone = service.issue_token("city_admin:shanghai")
    # gone is told apart from kept by its last use.
    with _at(NOW + timedelta(minutes=1)):
        service.authenticate(gone)
    gone_id = next(
        item["id"]
        for item in service.list_tokens()["items"]
        if item["last_used_at"] == "2026-03-01T08:01:00Z"
    )
    with pytest.raises(NotFound) as info:
        service.revoke_token(gone_id, role="city_admin:beijing")
    assert info.value.code == "token_not_found"
    with _at(NOW + timedelta(minutes=2)):
        revoked = service.revoke_token(gone_id, role="city_admin:shanghai")
    assert (revoked["status"], revoked["revoked_at"]) == (
        "revoked",
        "2026-03-01T08:02:00Z",
    )
    with _at(NOW + timedelta(minutes=3)):
        assert service.authenticate(gone) is None
        assert service.authenticate(kept) == {"role": "city_admin:shanghai"}
    for wrong in ("tok_0000000000000000", "not-an-id", None, 7):
        with pytest.raises(NotFound):
            service.revoke_token(wrong)


def _at_company_tokens(moment):
    return patch("services.city_registry.company_tokens.utcnow", return_value=moment)


def test_a_company_is_issued_its_first_token_once(service):
    with _at_company_tokens(NOW):
        first = service.issue_company_token(C1.lower())
        assert service.issue_company_token(C1) is None
    assert first["role"] == f"company:{C1}"
    assert tokens.TOKEN_ID.match(first["id"])
    assert first["expires_at"] == "2026-05-30T08:00:00Z"  # the default 90 days
    with _at(NOW):
        assert service.authenticate(first["token"]) == {"role": f"company:{C1}"}


def test_a_reissued_company_token_replaces_the_earlier_ones(service):
    with _at_company_tokens(NOW):
        first = service.issue_company_token(C1)
        again = service.reissue_company_token(C1)
    assert again["revoked_tokens"] == 1 and again["role"] == f"company:{C1}"
    with _at(NOW):
        assert service.authenticate(first["token"]) is None
        assert service.authenticate(again["token"]) == {"role": f"company:{C1}"}


@pytest.mark.parametrize("method", ["issue_company_token", "reissue_company_token"])
def test_a_malformed_credit_code_gets_no_company_token(service, method):
    wrong = C1[:17] + ("0" if C1[17] != "0" else "1")
    with pytest.raises(InvalidRequest) as info:
        getattr(service, method)(wrong)
    assert info.value.code == "invalid_credit_code"
    assert "check character" in info.value.message
    assert service.list_tokens()["total"] == 0
