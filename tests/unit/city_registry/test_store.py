"""The registry's store on an embedded SQLite database, migrated as in production:
seed, the read model's arithmetic and idempotency, keys and tokens."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.city_registry.domain import tokens, views
from services.city_registry.domain.events import ledger_delta
from services.city_registry.models import Base, City, Datacenter
from services.city_registry.store import RegistryStore, read_deploy_dir
from services.common import creditcode
from services.common.contracts import load_event, make_event
from services.common.db import make_engine
from services.common.migrations import upgrade
from tests.support.federation_data import program

DEPLOY_DIR = Path(__file__).resolve().parents[3] / "deploy"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
SHA = "b" * 64
COMPANY_1 = f"company:{creditcode.complete('91310000MA1QA0001')}"
COMPANY_2 = f"company:{creditcode.complete('91310000MA1QA0002')}"


@pytest.fixture
def engine(sqlite_url):
    upgrade("city_registry", sqlite_url)
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine):
    from sqlalchemy.orm import Session

    with Session(engine, expire_on_commit=False) as session:
        yield RegistryStore(session)


def _event(event_name, city, eid, **fields):
    return load_event(event_name, make_event(event_name, city, eid, **fields))


def _published(city="shanghai", eid="p1", budget=1_000_000, **extra):
    programs = [program(city, budget, rules_sha256=SHA)]
    return _event("program_published", city, eid, programs=programs, **extra)


def _issued(eid, face, code="SH-AAAAAAAAAAAA-0", city="shanghai", program=None):
    return _event(
        "voucher_issued",
        city,
        eid,
        voucher_code=code,
        program_id=program or f"{city}-compute",
        face_value_fen=face,
        expires_at=NOW + timedelta(days=365),
    )


def _redeemed(eid, subsidy, code="SH-AAAAAAAAAAAA-0", city="shanghai", program=None):
    return _event(
        "voucher_redeemed",
        city,
        eid,
        voucher_code=code,
        program_id=program,
        record_id=eid,
        datacenter_id="dc-1",
        gpu_seconds=3600,
        cost_fen=abs(subsidy) * 2,
        subsidy_fen=subsidy,
    )


def _released(eid, amount, code="SH-AAAAAAAAAAAA-0", city="shanghai", program=None):
    return _event(
        "voucher_released",
        city,
        eid,
        voucher_code=code,
        program_id=program,
        released_fen=amount,
        reason="expired",
    )


def _view(store, code="shanghai"):
    return views.city_view(store.city(code), NOW, 90)


def test_migration_matches_models(engine):
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert [d for d in diff if "alembic_version_city_registry" not in str(d)] == []


def test_seed_from_deploy_is_idempotent(store):
    cities, datacenters = read_deploy_dir(DEPLOY_DIR)
    store.seed(cities, datacenters)
    store.seed(cities, datacenters)
    codes = [city.code for city in store.cities()]
    assert {"shanghai", "chengdu", "shandong"} <= set(codes)
    assert len(codes) == len(set(codes))
    guian = store.datacenter("guian-gov-01")
    assert guian.hub_region == "west" and guian.government_run is True
    assert {item.gpu_model for item in guian.inventory} == {"H800", "Ascend-910B"}
    assert store.active_keys("guian-gov-01") == []
    assert store.city("shanghai").voucher_prefix == "SH"


def test_seed_does_not_touch_money_or_keys(store):
    cities, datacenters = read_deploy_dir(DEPLOY_DIR)
    store.seed(cities, datacenters)
    store.apply_event("program_published", _published(), NOW)
    store.apply_event("voucher_issued", _issued("i1", 500), NOW)
    store.add_key("guian-gov-01", "guian-gov-01-k1", "s1", NOW)
    store.seed(cities, datacenters)
    assert _view(store)["committed_fen"] == 500
    assert store.active_keys("guian-gov-01") == [
        {"key_id": "guian-gov-01-k1", "secret": "s1"}
    ]


def test_read_model_arithmetic(store):
    store.apply_event("program_published", _published(budget=10_000), NOW)
    store.apply_event("voucher_issued", _issued("i1", 3_000), NOW)
    store.apply_event("voucher_issued", _issued("i2", 2_000, code="SH-B"), NOW)
    store.apply_event("voucher_redeemed", _redeemed("r1", 700), NOW)
    store.apply_event("voucher_redeemed", _redeemed("r2", -200), NOW)  # reversal
    store.apply_event("voucher_released", _released("x1", 1_500, code="SH-B"), NOW)
    view = _view(store)
    assert view["budget_fen"] == 10_000
    assert view["committed_fen"] == 5_000 - 500 - 1_500
    assert view["redeemed_fen"] == 500
    assert view["released_fen"] == 1_500
    assert view["available_fen"] == 10_000 - 3_000 - 500
    assert view["vouchers_issued"] == 2
    (program,) = view["programs"]
    # redemptions and releases without program_id are booked by voucher code
    for key in ("committed_fen", "redeemed_fen", "released_fen", "available_fen"):
        assert program[key] == view[key]
    assert program["rate_bp"] == 8000 and program["rules_sha256"] == SHA


def test_duplicate_event_is_applied_once(store):
    store.apply_event("program_published", _published(), NOW)
    assert store.apply_event("voucher_issued", _issued("i1", 300), NOW) is True
    assert store.apply_event("voucher_issued", _issued("i1", 300), NOW) is False
    view = _view(store)
    assert view["committed_fen"] == 300 and view["vouchers_issued"] == 1


def test_binding_changed_is_recorded_once_and_moves_no_figures(store):
    store.apply_event("program_published", _published(), NOW)
    store.apply_event("voucher_issued", _issued("i1", 300), NOW)
    before = _view(store)
    changed = _event(
        "binding_changed",
        "shanghai",
        "b1",
        voucher_code="SH-AAAAAAAAAAAA-0",
        company_id="91310000MA1FL5XX1K",
        datacenter_id="dc-1",
        tenant_id="tenant-1",
        status="authorised",
        actor="company:91310000MA1FL5XX1K",
        changed_at=NOW,
    )

    assert store.apply_event("binding_changed", changed, NOW) is True
    assert store.apply_event("binding_changed", changed, NOW) is False
    assert _view(store) == before


def test_city_joins_by_its_first_program_published(store):
    store.apply_event(
        "program_published",
        _published("wuhan", name="Wuhan", region="central", voucher_prefix="WH"),
        NOW,
    )
    view = _view(store, "wuhan")
    # Its name and region as published; a prefix is reserved, never published.
    assert (view["name"], view["region"], view["voucher_prefix"]) == (
        "Wuhan",
        "central",
        None,
    )
    assert view["status"] == "unknown"


def test_prefixes_come_from_reservations_only(store):
    assert store.admit_city("shanghai", "Shanghai", NOW, "SH") == "admitted"
    store.apply_event("program_published", _published(voucher_prefix="SH"), NOW)
    store.apply_event(
        "program_published", _published("fake", "p2", voucher_prefix="SH"), NOW
    )
    store.apply_event(
        "program_published", _published("wuhan", "p3", voucher_prefix="WH"), NOW
    )
    assert views.voucher_prefixes(store.cities()) == {"SH": "shanghai"}
    assert store.voucher_prefix("shanghai") == "SH"
    assert store.voucher_prefix("wuhan") is None


def test_admission_reserves_the_requested_prefix_when_free(store):
    assert store.admit_city("ningbo", "Ningbo", NOW, "NBO") == "admitted"
    assert store.voucher_prefix("ningbo") == "NBO"


def test_admission_derives_a_unique_prefix_when_the_requested_is_taken(store):
    store.admit_city("shanghai", "Shanghai", NOW, "SH")
    store.admit_city("shandong", "Shandong", NOW, "SH")
    store.admit_city("shantou", "Shantou", NOW)
    held = {city.code: city.voucher_prefix for city in store.cities()}
    assert held["shanghai"] == "SH"
    assert held["shandong"] not in (None, "SH")
    assert held["shantou"] not in (None, "SH", held["shandong"])
    assert len(set(held.values())) == 3


def test_a_refused_admission_reserves_nothing(store):
    store.admit_city("ningbo", "Ningbo", NOW, "NB")
    store.credentials_delivered(City, "ningbo")
    assert store.admit_city("ningbo", "Ningbo", NOW, "NX") == "exists"
    assert store.voucher_prefix("ningbo") == "NB"
    assert views.voucher_prefixes(store.cities()) == {"NB": "ningbo"}


def test_an_admission_whose_credentials_were_never_delivered_is_pending(store):
    assert store.admit_city("ningbo", "Ningbo", NOW, "NB") == "admitted"
    # The grant failed: the same admission again is told to complete it,
    # with the prefix it reserved the first time.
    assert store.admit_city("ningbo", "Ningbo", NOW, "NX") == "pending"
    assert store.voucher_prefix("ningbo") == "NB"
    store.credentials_delivered(City, "ningbo")
    assert store.admit_city("ningbo", "Ningbo", NOW) == "exists"


def test_a_registration_whose_credentials_were_never_delivered_is_pending(store):
    cities, datacenters = read_deploy_dir(DEPLOY_DIR)
    first = datacenters[0]
    store.seed(cities, datacenters)
    assert store.add_datacenter(first, NOW) == "exists"  # seeded: not pending
    new = replace(first, id="wuhan-new-01", name="Wuhan New")
    assert store.add_datacenter(new, NOW) == "added"
    renamed = replace(new, name="Wuhan New Computing Centre")
    assert store.add_datacenter(renamed, NOW) == "pending"
    assert store.datacenter("wuhan-new-01").name == "Wuhan New Computing Centre"
    store.credentials_delivered(Datacenter, "wuhan-new-01")
    assert store.add_datacenter(renamed, NOW) == "exists"


def test_seeded_cities_get_their_files_prefixes_and_keep_them(store):
    cities, datacenters = read_deploy_dir(DEPLOY_DIR)
    store.seed(cities, datacenters)
    expected = {city.code: city.voucher_prefix for city in cities}
    assert views.voucher_prefixes(store.cities()) == {
        prefix: code for code, prefix in expected.items()
    }
    # A preset admitted later keeps its reservation, whatever it asks for.
    assert store.admit_city("shanghai", "Shanghai", NOW, "SHX") == "admitted"
    assert store.voucher_prefix("shanghai") == "SH"
    # A file changed to ask for another: the reservation stands.
    moved = [replace(city, voucher_prefix="ZZ") for city in cities]
    store.seed(moved, datacenters)
    assert store.voucher_prefix("chengdu") == "CD"


def test_a_seed_asking_for_a_held_prefix_is_given_another(store):
    store.admit_city("chongqing", "Chongqing", NOW, "CD")
    cities, datacenters = read_deploy_dir(DEPLOY_DIR)
    store.seed(cities, datacenters)
    assert store.voucher_prefix("chongqing") == "CD"
    assert store.voucher_prefix("chengdu") not in (None, "CD")


def test_events_before_program_published_still_count(store):
    store.apply_event("voucher_issued", _issued("i1", 400, city="hefei"), NOW)
    store.apply_event("program_published", _published("hefei", "p1", budget=900), NOW)
    view = _view(store, "hefei")
    assert view["committed_fen"] == 400 and view["available_fen"] == 500
    assert view["programs"][0]["available_fen"] == 500


def test_redemption_of_unknown_voucher_counts_for_the_city(store):
    store.apply_event("voucher_redeemed", _redeemed("r1", 50, code="SH-Z"), NOW)
    view = _view(store)
    assert view["redeemed_fen"] == 50 and view["programs"] == []


def test_heartbeat_keeps_the_latest_moment(store):
    late, early = NOW - timedelta(seconds=5), NOW - timedelta(seconds=500)
    store.apply_event(
        "heartbeat",
        _event("heartbeat", "shanghai", "h1", version="1", uptime_s=1),
        late,
    )
    store.apply_event(
        "heartbeat",
        _event("heartbeat", "shanghai", "h2", version="1", uptime_s=1),
        early,
    )
    assert store.city("shanghai").last_heartbeat_at == late
    assert (
        views.city_status(store.city("shanghai").last_heartbeat_at, NOW, 90) == "live"
    )


def test_key_rotation_keeps_two_active(store):
    store.seed(*read_deploy_dir(DEPLOY_DIR))
    for n in (1, 2, 3):
        assert store.add_key("guian-gov-01", f"k{n}", f"s{n}", NOW)
    assert [k["key_id"] for k in store.active_keys("guian-gov-01")] == ["k3", "k2"]
    assert store.add_key("nowhere", "k9", "s9", NOW) is False


def _add_token(store, secret, role="city_admin:shanghai", **kwargs):
    token_id = tokens.new_token_id()
    store.add_token(
        tokens.token_digest(secret),
        role,
        kwargs.pop("now", NOW),
        token_id=token_id,
        **kwargs,
    )
    return token_id


def test_tokens(store):
    _add_token(store, "tok")
    assert store.role_for(tokens.token_digest("tok"), NOW) == "city_admin:shanghai"
    assert store.role_for(tokens.token_digest("other"), NOW) is None


def test_an_expired_token_grants_nothing(store):
    _add_token(store, "tok", expires_at=NOW + timedelta(days=1))
    digest = tokens.token_digest("tok")
    assert store.role_for(digest, NOW + timedelta(hours=23)) == "city_admin:shanghai"
    assert store.role_for(digest, NOW + timedelta(days=1)) is None
    assert store.role_for(digest, NOW + timedelta(days=400)) is None


def test_last_use_is_written_at_most_every_few_minutes(store):
    token_id = _add_token(store, "tok")
    digest = tokens.token_digest("tok")
    store.role_for(digest, NOW)
    store.role_for(digest, NOW + timedelta(minutes=1))
    ((listed,), _) = store.tokens("city_admin:shanghai")
    assert (listed["id"], listed["last_used_at"]) == (token_id, NOW)
    store.role_for(digest, NOW + tokens.LAST_USED_RESOLUTION)
    ((listed,), _) = store.tokens()
    assert listed["last_used_at"] == NOW + tokens.LAST_USED_RESOLUTION


def test_tokens_are_listed_by_role_without_their_digest(store):
    mine = _add_token(store, "a", COMPANY_1)
    _add_token(store, "b", COMPANY_2, now=NOW + timedelta(seconds=1))
    rows, total = store.tokens(COMPANY_1)
    assert (total, [row["id"] for row in rows]) == (1, [mine])
    assert set(rows[0]) == {
        "id",
        "role",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    }
    everyone, total = store.tokens(limit=1)
    assert total == 2 and len(everyone) == 1
    assert everyone[0]["role"] == COMPANY_2  # newest first


def test_one_token_is_revoked_by_id_and_only_in_its_role(store):
    first = _add_token(store, "a")
    _add_token(store, "b")
    later = NOW + timedelta(minutes=1)
    assert store.revoke_token(first, later, role="city_admin:beijing") is None
    assert store.role_for(tokens.token_digest("a"), later) == "city_admin:shanghai"
    revoked = store.revoke_token(first, later, role="city_admin:shanghai")
    assert revoked["revoked_at"] == later
    assert store.role_for(tokens.token_digest("a"), later) is None
    assert store.role_for(tokens.token_digest("b"), later) == "city_admin:shanghai"
    # Again: nothing changes, the first revocation's time stays.
    again = store.revoke_token(first, later + timedelta(hours=1))
    assert again["revoked_at"] == later
    assert store.revoke_token("tok_0000000000000000", later) is None


_events = st.lists(
    st.tuples(
        st.sampled_from(["issued", "redeemed", "released"]),
        st.integers(min_value=0, max_value=15),  # event number: repeats = duplicates
        st.integers(min_value=1, max_value=10_000),
    ),
    max_size=30,
)


@pytest.fixture(scope="module")
def shared_engine(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('hypothesis') / 'registry.db'}"
    upgrade("city_registry", url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


_examples = iter(range(10**9))


# No deadline: an example is up to 30 SQLite commits, which a loaded machine
# stretches past hypothesis's 200 ms; the property is arithmetic, not speed.
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(events=_events, attributed=st.booleans())
def test_totals_equal_the_sum_of_distinct_events(shared_engine, events, attributed):
    """Whatever the order and repetition, each distinct event counts once.

    With ``program_id`` on every event (the vouchers service sends it) the
    program's figures equal the city's even when a redemption overtakes its
    issue; without it such a redemption counts for the city only.
    """
    from sqlalchemy.orm import Session

    city = f"c{next(_examples)}"
    code, program = f"{city.upper()}-V", f"{city}-compute"
    expected = {"committed_fen": 0, "redeemed_fen": 0, "released_fen": 0}
    seen = set()
    build = {"issued": _issued, "redeemed": _redeemed, "released": _released}
    with Session(shared_engine) as session:
        store = RegistryStore(session)
        store.apply_event(
            "program_published", _published(city, f"{city}-p1", budget=10**9), NOW
        )
        for kind, number, amount in events:
            eid = f"{city}-{kind}-{number}"
            body = build[kind](
                eid,
                amount,
                code=code,
                city=city,
                program=program if attributed else None,
            )
            store.apply_event(f"voucher_{kind}", body, NOW)
            if eid not in seen:
                seen.add(eid)
                delta = ledger_delta(f"voucher_{kind}", body)
                expected["committed_fen"] += delta.committed_fen
                expected["redeemed_fen"] += delta.redeemed_fen
                expected["released_fen"] += delta.released_fen
        view = _view(store, city)
    for key, value in expected.items():
        assert view[key] == value
        if attributed:
            assert view["programs"][0][key] == value
    assert view["available_fen"] + view["committed_fen"] + view["redeemed_fen"] == 10**9


def _first_token(store, secret, role=COMPANY_1, now=NOW, **kwargs):
    return store.add_first_token(
        tokens.token_digest(secret),
        role,
        now,
        token_id=tokens.new_token_id(),
        **kwargs,
    )


def test_a_company_gets_a_first_token_only_while_it_has_no_live_one(store):
    assert _first_token(store, "first", expires_at=NOW + timedelta(days=1))
    assert not _first_token(store, "second")
    assert store.role_for(tokens.token_digest("second"), NOW) is None
    assert _first_token(store, "other", role=COMPANY_2)  # another company
    # Expired, the first no longer counts: the next voucher brings a token.
    tomorrow = NOW + timedelta(days=1)
    assert _first_token(store, "third", now=tomorrow)
    assert store.role_for(tokens.token_digest("third"), tomorrow) == COMPANY_1


def test_a_revoked_token_does_not_count_as_live(store):
    token_id = _add_token(store, "old", COMPANY_1)
    store.revoke_token(token_id, NOW)
    assert _first_token(store, "new")


def test_two_first_tokens_at_once_store_one(sqlite_url):
    """Real threads, a session each, on one SQLite file: the insert takes the
    database's write lock, so the second counts the first's token."""
    import threading

    from sqlalchemy.orm import Session

    upgrade("city_registry", sqlite_url)
    engine = make_engine(sqlite_url)
    barrier = threading.Barrier(6)
    outcomes = []

    def race(n):
        with Session(engine, expire_on_commit=False) as session:
            barrier.wait()
            outcomes.append(_first_token(RegistryStore(session), f"t{n}"))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with Session(engine) as session:
        _, total = RegistryStore(session).tokens(COMPANY_1)
    engine.dispose()
    assert sorted(outcomes) == [False] * 5 + [True]
    assert total == 1


def test_replacing_a_companys_tokens_revokes_every_earlier_one(store):
    _add_token(store, "a", COMPANY_1)
    _add_token(store, "b", COMPANY_1)
    _add_token(store, "c", COMPANY_2)
    later = NOW + timedelta(minutes=1)
    revoked = store.replace_tokens(
        tokens.token_digest("new"), COMPANY_1, later, token_id=tokens.new_token_id()
    )
    assert revoked == 2
    assert store.role_for(tokens.token_digest("a"), later) is None
    assert store.role_for(tokens.token_digest("b"), later) is None
    assert store.role_for(tokens.token_digest("new"), later) == COMPANY_1
    assert store.role_for(tokens.token_digest("c"), later) == COMPANY_2
