"""Federation rules of the registry: admission, drift, recommendations, permissions."""

import re

import pytest

from services.city_registry import broker
from services.city_registry.domain import (
    events,
    prefixes,
    recommendations,
    reconciliation,
    seeds,
)
from services.city_registry.domain.recommendations import voucher_terms
from services.city_registry.domain.state import (
    CityState,
    DatacenterState,
    InventoryItem,
    ProgramState,
)
from services.common.errors import InvalidRequest
from services.common.vouchercode import PREFIX, generate


def _dc(dc_id, price, hub="west", gov=False, count=64):
    return DatacenterState(
        id=dc_id,
        name=dc_id,
        operator="op",
        city="x",
        hub_region=hub,
        government_run=gov,
        inventory=[InventoryItem("H800", count, "imported", price)],
    )


@pytest.mark.parametrize("code", ["", "Ningbo", "a-b", "x" * 49, None])
def test_bad_city_codes_are_refused(code):
    with pytest.raises(InvalidRequest):
        seeds.check_city_admission(code, "Name")


def test_datacenter_registration_needs_an_inventory():
    with pytest.raises(InvalidRequest):
        seeds.parse_datacenter_registration({"id": "dc-1", "inventory": []})


def test_drift_names_city_program_and_field():
    city = CityState(
        code="nb",
        name="Ningbo",
        redeemed_fen=600,
        committed_fen=400,
        vouchers_issued=1,
        programs=[
            ProgramState(
                id="p",
                budget_fen=1000,
                committed_fen=400,
                redeemed_fen=600,
                vouchers_issued=1,
            )
        ],
    )
    totals = {
        "programs": [
            {
                "program_id": "p",
                "budget_fen": 1000,
                "committed_fen": 400,
                "redeemed_fen": 500,
                "released_fen": 0,
                "vouchers_issued": 1,
            }
        ]
    }
    drift = reconciliation.ledger_drift(city, totals)
    assert {
        (d["city"], d["program_id"], d["field"], d["difference"]) for d in drift
    } == {("nb", "p", "redeemed_fen", 100), ("nb", None, "redeemed_fen", 100)}
    totals["programs"][0]["redeemed_fen"] = 600
    assert reconciliation.ledger_drift(city, totals) == []


def test_recommendations_rank_by_net_cost_after_bonuses_and_scope():
    published = {
        "max_rate_bp": 6000,
        "bonuses": [{"when": {"government_run": True}, "add_bp": 2000}],
        "datacenters": {"exclude": ["banned"]},
    }
    program = ProgramState(id="p", rate_bp=5000, terms=published)
    terms = voucher_terms("sh", program, balance_fen=10**9)
    dcs = [_dc("cheap", 1000), _dc("gov", 1200, gov=True), _dc("banned", 100)]
    ranked = recommendations.recommend(dcs, None, "H800", 1, 1, terms)
    assert [r["datacenter_id"] for r in ranked] == ["gov", "cheap", "banned"]
    gov = ranked[0]
    assert gov["rate_bp"] == 6000 and gov["net_cost_fen"] == 1200 - 720
    assert any("capped" in line for line in gov["explanation"])
    assert not ranked[2]["voucher_applies"]


def test_recommendations_prefer_spare_capacity_at_equal_cost():
    overview = {"datacenters": {"busy": {"utilisation_window": 0.9}}}
    ranked = recommendations.recommend(
        [_dc("busy", 1000), _dc("idle", 1000)], overview, "H800", 4, 1
    )
    assert [r["datacenter_id"] for r in ranked] == ["idle", "busy"]


def test_a_city_user_may_touch_only_its_own_names():
    perms = broker.city_permissions("nb")
    assert re.match(perms.configure, "rpc-vouchers_nb")
    assert re.match(perms.read, "vouchers_nb.usage_rated")
    assert not re.match(perms.configure, "rpc-vouchers_nbx")
    assert not re.match(perms.read, "vouchers_sh.usage_rated")
    write, read = perms.topics[broker.FEDERATION]
    assert re.match(write, "nb.heartbeat") and not re.match(write, "sh.heartbeat")
    assert not re.match(read, "sh.usage_rated")


def test_management_target_defaults_to_the_amqp_uri():
    url, auth, vhost = broker.management_target("amqp://u:p@rabbit:5672/v%2F1", None)
    assert (url, auth, vhost) == ("http://rabbit:15672", ("u", "p"), "v/1")


# -- voucher prefixes, reserved at admission ---------------------------------


def test_a_free_requested_prefix_is_taken():
    assert prefixes.assign("ningbo", "NBO", {"SH", "NB"}) == "NBO"


def test_a_taken_requested_prefix_gives_a_derived_unique_one():
    taken = {"SH", "SHA", "SHAN"}
    derived = prefixes.assign("shandong", "SH", taken)
    assert derived not in taken and PREFIX.match(derived)


@pytest.mark.parametrize(
    ("code", "expected"),
    [("shanghai", "SH"), ("inner_mongolia", "IM"), ("x1", "XA")],
)
def test_without_a_request_the_prefix_is_derived_from_the_code(code, expected):
    assert prefixes.assign(code, None, set()) == expected


def test_derived_prefixes_stay_unique_however_many_cities_share_initials():
    taken: set[str] = set()
    for n in range(200):
        prefix = prefixes.assign(f"sh{n}", "SH", taken)
        assert prefix not in taken and PREFIX.match(prefix)
        taken.add(prefix)


@pytest.mark.parametrize("prefix", ["sh", "S", "SHANG", "S1", "", 12, "SH "])
def test_an_invalid_requested_prefix_is_refused(prefix):
    with pytest.raises(InvalidRequest) as info:
        seeds.check_city_admission("ningbo", "Ningbo", prefix)
    assert info.value.code == "invalid_voucher_prefix"


def test_admission_without_a_prefix_asks_for_none():
    assert seeds.check_city_admission("ningbo", " Ningbo ") == (
        "ningbo",
        "Ningbo",
        None,
    )


def test_events_must_carry_the_citys_reserved_prefix():
    own = {"city": "shanghai", "voucher_code": generate("SH")}
    events.check_voucher_prefix("voucher_issued", own, "SH")
    events.check_voucher_prefix(
        "program_published", {"city": "shanghai", "voucher_prefix": "SH"}, "SH"
    )
    events.check_voucher_prefix("program_published", {"city": "shanghai"}, "SH")
    for event, body, assigned in [
        ("program_published", {"city": "fake", "voucher_prefix": "SH"}, "FK"),
        ("program_published", {"city": "fake", "voucher_prefix": "SH"}, None),
        ("voucher_issued", {"city": "fake", "voucher_code": generate("SH")}, "FK"),
        ("voucher_redeemed", {"city": "fake", "voucher_code": generate("SH")}, None),
        ("voucher_released", {"city": "fake", "voucher_code": "FK-1"}, "FK"),
    ]:
        with pytest.raises(events.RejectedEvent):
            events.check_voucher_prefix(event, body, assigned)


def test_a_datacenter_registration_needs_no_city():
    dc = seeds.parse_datacenter_registration(
        {
            "id": "dc-1",
            "name": "DC",
            "operator": "op",
            "hub_region": "west",
            "government_run": True,
            "inventory": [
                {
                    "gpu_model": "H800",
                    "count": 8,
                    "chip_origin": "imported",
                    "price_fen_per_gpu_hour": 1500,
                }
            ],
        }
    )
    assert dc.city is None and dc.hub_region == "west"
