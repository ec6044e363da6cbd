"""The registry recommends with the rate each city books: for every preset city,
a recommendation's rate and subsidy at a data centre are the vouchers' own for
the same data-centre attributes, the terms having crossed the wire."""

import itertools
from pathlib import Path

import pytest
import yaml

from services.city_registry.domain import seeds
from services.city_registry.domain.events import program_terms
from services.city_registry.domain.recommendations import recommend, voucher_terms
from services.city_registry.domain.state import (
    DatacenterState,
    InventoryItem,
    ProgramState,
)
from services.common.contracts import ProgramPublishedSchema
from services.vouchers import domain
from services.vouchers.rules import load_rules

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
CITIES = sorted((DEPLOY / "cities").glob("*.yaml"))
GPU = "H800"
UTILISATIONS = [None, 0.1, 0.29, 0.3, 0.6, 1.2]


def datacenters():
    """The preset data centres, and one of every kind a bonus or scope can tell
    apart, each at a different utilisation."""
    preset = seeds.parse_datacenter_seeds(
        yaml.safe_load((DEPLOY / "datacenters.yaml").read_text()), "datacenters"
    )
    kinds = itertools.product(
        (True, False), ("east", "west", "north"), ("domestic", "imported")
    )
    made = [
        DatacenterState(
            id=f"dc-{index}",
            name=f"dc-{index}",
            operator="op",
            city="x",
            hub_region=hub,
            government_run=government_run,
            inventory=[InventoryItem(GPU, 64, origin, 1000 + 37 * index)],
        )
        for index, (government_run, hub, origin) in enumerate(kinds)
    ]
    return preset + made


def overview(dcs):
    return {
        "datacenters": {
            dc.id: {"utilisation_window": UTILISATIONS[index % len(UTILISATIONS)]}
            for index, dc in enumerate(dcs)
        }
    }


def published(rules, program):
    """``program`` as the registry has it after ``program_published``."""
    summary = domain.program_summary(
        program, rules.version, rules.sha256, program.budget_fen, 1, 0, 0
    )
    body = ProgramPublishedSchema().load(
        {
            "event_id": "e",
            "city": rules.city,
            "occurred_at": "2026-01-01T00:00:00Z",
            "programs": [summary],
        }
    )
    wire = body["programs"][0]
    return ProgramState(
        id=wire["id"], rate_bp=wire["rate_bp"], terms=program_terms(wire)
    )


@pytest.mark.parametrize("path", CITIES, ids=lambda path: path.stem)
def test_a_recommendation_rates_as_the_city_books(path):
    rules = load_rules(path)
    dcs = datacenters()
    by_id = {dc.id: dc for dc in dcs}
    models = sorted({item.gpu_model for dc in dcs for item in dc.inventory})
    checked = 0
    for program, balance in itertools.product(rules.programs, (None, 150)):
        terms = voucher_terms(rules.city, published(rules, program), balance)
        for model in models:
            for row in recommend(dcs, overview(dcs), model, 1, 2, terms):
                dc = by_id[row["datacenter_id"]]
                attrs = {
                    "government_run": dc.government_run,
                    "hub_region": dc.hub_region,
                    "chip_origin": row["chip_origin"],
                    "utilisation": row["utilisation"],
                }
                admitted = program.datacenters.admits(dc.id, attrs)
                assert row["voucher_applies"] == admitted
                rate = domain.effective_rate_bp(program, attrs) if admitted else 0
                assert row["rate_bp"] == rate, (program.id, dc.id, row["explanation"])
                limit = balance if balance is not None else row["cost_fen"]
                subsidy = domain.subsidy_fen(row["cost_fen"], rate, limit, limit)
                assert row["subsidy_fen"] == subsidy
                checked += 1
    assert checked >= len(rules.programs) * len(dcs)


def test_the_preset_cities_exercise_bonuses_and_scopes():
    # Keeps the test above from passing on terms that never differ.
    programs = [p for path in CITIES for p in load_rules(path).programs]
    assert any(bonus.when for p in programs for bonus in p.bonuses)
    assert any(
        domain.UTILISATION_BELOW in dict(bonus.when)
        for p in programs
        for bonus in p.bonuses
    )
    assert any(p.datacenters != domain.ANYWHERE for p in programs)
