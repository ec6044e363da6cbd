"""The registry's rules, without broker or database."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.city_registry.domain import events, seeds, tokens, views
from services.city_registry.domain.events import LedgerDelta, RejectedEvent
from services.city_registry.domain.state import (
    CityState,
    DatacenterState,
    InventoryItem,
    ProgramState,
)
from services.common.contracts import event_id, make_event
from services.common.errors import InvalidRequest

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
SHA = "a" * 64


def _bytes(body):
    return json.dumps(body).encode()


# ------------------------------------------------------------- ledger


def test_issue_commits_the_face_value():
    delta = events.ledger_delta("voucher_issued", {"face_value_fen": 150_000_00})
    assert delta == LedgerDelta(committed_fen=150_000_00, vouchers_issued=1)


def test_redemption_moves_subsidy_from_committed_to_redeemed():
    delta = events.ledger_delta("voucher_redeemed", {"subsidy_fen": 800})
    assert delta == LedgerDelta(committed_fen=-800, redeemed_fen=800)


def test_correction_reversal_moves_subsidy_back():
    delta = events.ledger_delta("voucher_redeemed", {"subsidy_fen": -800})
    assert delta == LedgerDelta(committed_fen=800, redeemed_fen=-800)


def test_release_returns_the_balance():
    delta = events.ledger_delta("voucher_released", {"released_fen": 500})
    assert delta == LedgerDelta(committed_fen=-500, released_fen=500)


@pytest.mark.parametrize("event", ["heartbeat", "program_published"])
def test_other_events_move_no_money(event):
    assert events.ledger_delta(event, {}).is_zero


@given(
    budget=st.integers(min_value=1, max_value=10**12),
    faces=st.lists(st.integers(min_value=1, max_value=10**8), max_size=20),
    data=st.data(),
)
def test_available_committed_redeemed_sum_to_budget(budget, faces, data):
    committed = redeemed = released = 0
    for face in faces:
        subsidy = data.draw(st.integers(min_value=0, max_value=face))
        rest = face - subsidy
        for delta in (
            events.ledger_delta("voucher_issued", {"face_value_fen": face}),
            events.ledger_delta("voucher_redeemed", {"subsidy_fen": subsidy}),
            events.ledger_delta("voucher_released", {"released_fen": rest}),
        ):
            committed += delta.committed_fen
            redeemed += delta.redeemed_fen
            released += delta.released_fen
    available = views.available_fen(budget, committed, redeemed)
    assert available + committed + redeemed == budget
    assert committed == 0  # every voucher fully redeemed or released
    assert redeemed + released == sum(faces)


# ------------------------------------------------------------- liveness


def test_city_never_heard_from_is_unknown():
    assert views.city_status(None, NOW, 90) == "unknown"


def test_city_is_live_within_the_window_and_stale_after():
    assert views.city_status(NOW - timedelta(seconds=90), NOW, 90) == "live"
    assert views.city_status(NOW - timedelta(seconds=91), NOW, 90) == "stale"


def test_heartbeat_from_a_fast_clock_is_not_in_the_future():
    ahead = NOW + timedelta(minutes=10)
    assert events.heartbeat_moment(ahead, NOW) == NOW
    behind = NOW - timedelta(seconds=5)
    assert events.heartbeat_moment(behind, NOW) == behind


# ------------------------------------------------------------- decoding


def _issued(city="shanghai", **overrides):
    fields = {
        "voucher_code": "SH-AAAAAAAAAAAA-0",
        "program_id": "sh-compute-2025",
        "face_value_fen": 100,
        "expires_at": NOW + timedelta(days=365),
    }
    fields.update(overrides)
    return make_event("voucher_issued", city, event_id("t", city), **fields)


def test_decode_event_loads_body_by_routing_key():
    event, body = events.decode_event("shanghai.voucher_issued", _bytes(_issued()))
    assert event == "voucher_issued"
    assert body["face_value_fen"] == 100
    assert body["occurred_at"].tzinfo is not None


def test_decode_event_refuses_a_body_of_another_city():
    with pytest.raises(RejectedEvent, match="names city 'chengdu'"):
        events.decode_event("shanghai.voucher_issued", _bytes(_issued("chengdu")))


@pytest.mark.parametrize(
    "routing_key, body",
    [
        ("shanghai.voucher_issued", b"{not json"),
        ("shanghai.voucher_issued", b"[1, 2]"),
        ("shanghai.voucher_issued", _bytes({"event_id": "x", "city": "shanghai"})),
        ("shanghai.usage_rated", b"{}"),
        ("shanghai", b"{}"),
        ("Shang-hai.heartbeat", b"{}"),
    ],
)
def test_decode_event_rejects_malformed_messages(routing_key, body):
    with pytest.raises(RejectedEvent):
        events.decode_event(routing_key, body)


def test_decode_event_refuses_values_wider_than_their_columns():
    body = _issued(voucher_code="SH-" + "A" * 70)
    with pytest.raises(RejectedEvent, match="voucher_code longer than 64"):
        events.decode_event("shanghai.voucher_issued", _bytes(body))


def test_routing_keys_cover_the_registry_events():
    assert events.ROUTING_KEYS == [
        "*.program_published",
        "*.voucher_issued",
        "*.voucher_redeemed",
        "*.voucher_released",
        "*.heartbeat",
        "*.binding_changed",
        "*.usage_refused",
        "*.usage_held",
        "*.usage_released",
        "*.voucher_clawed_back",
    ]


# ------------------------------------------------------------- roles, keys


@pytest.mark.parametrize(
    "role",
    [
        "national_admin",
        "city_admin:shanghai",
        "company:91310000MA1FL5XX1G",
        "datacenter:guian-gov-01",
    ],
)
def test_valid_roles_are_accepted(role):
    assert tokens.validate_role(role) == role


@pytest.mark.parametrize(
    "role",
    [
        "",
        None,
        42,
        "national_admin:x",
        "city_admin",
        "city_admin:",
        "city_admin:Shanghai",
        "company",
        "company:",
        "company:shanghai",
        # the legacy shape with a city, even of a well-formed code
        "company:shanghai:91310000MA1FL5XX1G",
        # a wrong check character, lower case (not as the registry spells it)
        "company:91310000MA1FL5XX1K",
        "company:91310000ma1fl5xx1g",
        "company:91310000MA1FL5XX1G:x",
        "datacenter:Guian_01",
        "root",
    ],
)
def test_invalid_roles_are_refused(role):
    with pytest.raises(InvalidRequest) as info:
        tokens.validate_role(role)
    assert info.value.code == "invalid_role"


def test_a_company_role_is_its_normalised_credit_code():
    assert tokens.company_role(" 91310000ma1fl5xx1g ") == "company:91310000MA1FL5XX1G"


@pytest.mark.parametrize("code", ["91310000MA1FL5XX1K", "9131", None, "C1"])
def test_a_malformed_credit_code_makes_no_company_role(code):
    with pytest.raises(InvalidRequest) as info:
        tokens.company_role(code)
    assert info.value.code == "invalid_credit_code"


def test_tokens_are_random_and_stored_as_sha256():
    first, second = tokens.new_token(), tokens.new_token()
    assert first != second and len(first) >= 40
    digest = tokens.token_digest(first)
    assert len(digest) == 64 and first not in digest


def test_only_the_two_newest_keys_stay_active():
    assert tokens.keys_to_revoke(["k3", "k2", "k1"]) == ["k1"]
    assert tokens.keys_to_revoke(["k2", "k1"]) == []


# ------------------------------------------------------------- views


def _city(**overrides):
    base = dict(
        code="shanghai",
        name="Shanghai",
        region="east",
        voucher_prefix="SH",
        last_heartbeat_at=NOW - timedelta(seconds=10),
        committed_fen=300,
        redeemed_fen=200,
        released_fen=50,
        vouchers_issued=3,
        programs=[
            ProgramState(
                "sh-compute-2025",
                "compute",
                1000,
                8000,
                "v1",
                SHA,
                committed_fen=250,
                redeemed_fen=150,
                released_fen=50,
            ),
            ProgramState(
                "sh-data-2025",
                "training_data",
                500,
                5000,
                "v1",
                SHA,
                committed_fen=50,
                redeemed_fen=50,
            ),
        ],
    )
    base.update(overrides)
    return CityState(**base)


def _dc(dc_id, region, count):
    return DatacenterState(
        id=dc_id,
        name=dc_id,
        operator="op",
        city="x",
        hub_region=region,
        government_run=False,
        inventory=[InventoryItem("H100", count, "imported", 3000)],
    )


def test_city_view_money_and_programs():
    view = views.city_view(_city(), NOW, 90)
    assert view["status"] == "live"
    assert view["budget_fen"] == 1500
    assert view["available_fen"] == 1500 - 300 - 200
    assert view["last_heartbeat_at"] == "2025-06-01T11:59:50Z"
    compute = view["programs"][0]
    assert compute["id"] == "sh-compute-2025"
    assert compute["available_fen"] == 1000 - 250 - 150


OVERVIEW = {
    "datacenters": {
        "east-1": {
            "gpu_seconds_total": 1000,
            "gpu_seconds_window": 100,
            "capacity_gpu_seconds_window": 400,
            "utilisation_window": 0.25,
        },
        "west-1": {
            "gpu_seconds_total": 500,
            "gpu_seconds_window": 300,
            "capacity_gpu_seconds_window": 600,
            "utilisation_window": 0.5,
        },
    }
}


def test_network_summary_with_metering():
    cities = [_city(), _city(code="chengdu", last_heartbeat_at=None, programs=[])]
    dcs = [
        _dc("east-1", "east", 8),
        _dc("west-1", "west", 16),
        _dc("west-2", "west", 4),
    ]
    summary = views.network_summary(views.Snapshot.of(cities, dcs, NOW, 90), OVERVIEW)
    assert summary["cities"] == 2 and summary["live_cities"] == 1
    assert summary["datacenters"] == 3
    assert summary["budget_fen"] == 1500
    assert summary["committed_fen"] == 600 and summary["redeemed_fen"] == 400
    assert summary["available_fen"] == 1500 - 600 - 400
    assert summary["released_fen"] == 100
    assert summary["gpu_seconds"] == 1500
    assert summary["utilisation"] == pytest.approx(400 / 1000)
    assert summary["regions"] == {
        "east": {"datacenters": 1, "gpus": 8, "gpu_seconds": 1000, "utilisation": 0.25},
        "west": {"datacenters": 2, "gpus": 20, "gpu_seconds": 500, "utilisation": 0.5},
    }


def test_public_view_is_the_summary_beside_the_cities_it_sums():
    cities = [_city(), _city(code="chengdu", last_heartbeat_at=None, programs=[])]
    dcs = [_dc("east-1", "east", 8)]
    view = views.public_view(views.Snapshot.of(iter(cities), dcs, NOW, 90), OVERVIEW)
    assert view["summary"] == views.network_summary(
        views.Snapshot.of(cities, dcs, NOW, 90), OVERVIEW
    )
    assert view["cities"] == [views.city_view(c, NOW, 90) for c in cities]
    for money in ("budget_fen", "committed_fen", "redeemed_fen", "released_fen"):
        assert view["summary"][money] == sum(c[money] for c in view["cities"])


def test_one_overshooting_datacenter_cannot_inflate_its_region_or_the_nation():
    overview = {
        "datacenters": {
            **OVERVIEW["datacenters"],
            # Fresh capacity reports, but hours of jobs that started earlier.
            "west-2": {
                "gpu_seconds_total": 90_000,
                "gpu_seconds_window": 90_000,
                "capacity_gpu_seconds_window": 1_200,
                "utilisation_window": 1.0,
            },
        }
    }
    dcs = [
        _dc("east-1", "east", 8),
        _dc("west-1", "west", 16),
        _dc("west-2", "west", 4),
    ]
    summary = views.network_summary(
        views.Snapshot.of([_city()], dcs, NOW, 90), overview
    )
    assert summary["regions"]["west"]["utilisation"] == pytest.approx(
        (300 + 1_200) / (600 + 1_200)
    )
    assert summary["utilisation"] == pytest.approx((100 + 300 + 1_200) / 2_200)
    assert summary["utilisation"] <= 1


def test_network_summary_without_metering_keeps_the_money():
    summary = views.network_summary(
        views.Snapshot.of([_city()], [_dc("east-1", "east", 8)], NOW, 90), None
    )
    assert summary["budget_fen"] == 1500
    assert summary["gpu_seconds"] is None and summary["utilisation"] is None
    assert summary["regions"]["east"]["utilisation"] is None


def test_utilisation_is_null_without_capacity():
    overview = {"datacenters": {"east-1": {"gpu_seconds_total": 5}}}
    summary = views.network_summary(
        views.Snapshot.of([], [_dc("east-1", "east", 8)], NOW, 90), overview
    )
    assert summary["gpu_seconds"] == 5
    assert summary["utilisation"] is None
    assert summary["regions"]["east"]["utilisation"] is None


def test_datacenter_view_has_contract_shape():
    view = views.datacenter_view(_dc("east-1", "east", 8), OVERVIEW)
    assert view["utilisation"] == 0.25
    assert view["inventory"] == [
        {
            "gpu_model": "H100",
            "count": 8,
            "chip_origin": "imported",
            "price_fen_per_gpu_hour": 3000,
        }
    ]
    assert views.datacenter_view(_dc("x", "east", 1), None)["utilisation"] is None


def test_voucher_prefixes():
    cities = [_city(), _city(code="beijing", voucher_prefix=None)]
    assert views.voucher_prefixes(cities) == {"SH": "shanghai"}


# ------------------------------------------------------------- seed files


def test_city_seed_needs_only_the_listing_fields():
    city = seeds.parse_city_seed(
        {
            "city": "shanghai",
            "name": "Shanghai",
            "region": "east",
            "voucher_prefix": "SH",
            "programs": "not validated here",
        },
        "shanghai.yaml",
    )
    assert (city.code, city.name, city.region, city.voucher_prefix) == (
        "shanghai",
        "Shanghai",
        "east",
        "SH",
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "mapping"),
        ({"name": "X"}, "missing 'city'"),
        ({"city": "Shang Hai"}, "must match"),
        ({"city": "x", "voucher_prefix": "sh"}, "voucher_prefix"),
    ],
)
def test_bad_city_seed_names_the_file_and_problem(data, message):
    with pytest.raises(seeds.SeedError, match=message) as info:
        seeds.parse_city_seed(data, "bad.yaml")
    assert "bad.yaml" in str(info.value)


def test_datacenter_seeds():
    parsed = seeds.parse_datacenter_seeds(
        {
            "datacenters": [
                {
                    "id": "dc-1",
                    "name": "One",
                    "operator": "Op",
                    "city": "guiyang",
                    "hub_region": "west",
                    "government_run": True,
                    "inventory": [
                        {
                            "gpu_model": "H800",
                            "count": 4,
                            "chip_origin": "imported",
                            "price_fen_per_gpu_hour": 1800,
                        }
                    ],
                }
            ]
        },
        "datacenters.yaml",
    )
    assert parsed[0].gpus == 4 and parsed[0].government_run is True


def _entry_with_item(**item):
    """A data-centre entry, complete but for its one inventory item's faults."""
    good = {
        "gpu_model": "H1",
        "count": 1,
        "chip_origin": "imported",
        "price_fen_per_gpu_hour": 1,
    }
    return {
        "id": "dc-1",
        "name": "n",
        "operator": "o",
        "city": "c",
        "hub_region": "w",
        "inventory": [good | item],
    }


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"id": "DC_1"}, "must match"),
        ({"id": "dc-1", "name": "n", "operator": "o", "city": "c"}, "hub_region"),
        (_entry_with_item(count=-1), "count"),
        (_entry_with_item(chip_origin="alien"), "chip_origin"),
    ],
)
def test_bad_datacenter_seed_is_refused(entry, message):
    with pytest.raises(seeds.SeedError, match=message):
        seeds.parse_datacenter_seeds({"datacenters": [entry]}, "datacenters.yaml")
