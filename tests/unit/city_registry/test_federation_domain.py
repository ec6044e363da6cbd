"""Federation rules of the registry: admission, drift, recommendations, permissions."""

import re

import pytest

from services.city_registry import broker
from services.city_registry.domain import recommendations, reconciliation, seeds
from services.city_registry.domain.recommendations import voucher_terms
from services.city_registry.domain.state import (
    CityState,
    DatacenterState,
    InventoryItem,
    ProgramState,
)
from services.common.errors import InvalidRequest


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
