"""Loading and validating city rules files (CONTRACTS.md §5)."""

import hashlib

import pytest

from services.vouchers import domain
from services.vouchers.rules import RulesError, instance_rules, load_rules, parse_rules
from tests.support.vouchers_data import DEPLOY_CITIES as DEPLOY
from tests.support.vouchers_data import MINIMAL_RULES as VALID


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_is_valid(path):
    rules = load_rules(path, path.stem)
    assert rules.city == path.stem
    assert rules.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rules.version == rules.sha256[:12]
    assert rules.programs


def test_shanghai_preset_in_fen_and_basis_points():
    rules = load_rules(DEPLOY / "shanghai.yaml", "shanghai")
    compute = rules.program("sh-compute-2025")
    assert rules.voucher_prefix == "SH"
    assert compute.budget_fen == 600_000_000 * 100
    assert (compute.rate_bp, compute.max_rate_bp) == (8000, 9000)
    assert (compute.face_min_fen, compute.face_max_fen) == (100_000_000, 200_000_000)
    assert compute.bonuses == (domain.Bonus((("government_run", True),), 1000),)
    assert compute.datacenters == domain.ANYWHERE


def test_version_key_wins_over_hash():
    rules = parse_rules(("version: '2025-03'\n" + VALID).encode())
    assert rules.version == "2025-03"


def test_datacenter_scopes():
    ids = parse_rules(
        VALID.replace("datacenters: any", "datacenters: [dc-a, dc-b]").encode()
    )
    assert ids.programs[0].datacenters.ids == frozenset({"dc-a", "dc-b"})
    hub = parse_rules(
        VALID.replace("datacenters: any", "datacenters: {hub_region: west}").encode()
    )
    assert hub.programs[0].datacenters.hub_region == "west"


@pytest.mark.parametrize(
    "old, new, problem",
    [
        (
            "    valid_days: 365\n",
            "    valid_days: 365\n    colour: red\n",
            "unknown key 'colour'",
        ),
        ("budget_cny: 1000000", "budget_cny: lots", "budget must be a whole number"),
        (
            "budget_cny: 1000000",
            "budget_cny: 0",
            "budget must be a whole number of CNY > 0",
        ),
        ("budget_cny: 1000000", "budget_cny: -5", "> 0"),
        (
            "rate_percent: 80",
            "rate_percent: 95",
            "rate_percent 95 is above max_rate_percent 90",
        ),
        ("max_rate_percent: 90", "max_rate_percent: 120", "percentage in (0, 100]"),
        (
            "registered_in: testcity",
            "registered_on: testcity",
            "unknown predicate 'registered_on'",
        ),
        (
            "registered_in: testcity",
            "max_employees: many",
            "max_employees takes a whole number",
        ),
        ("kind: compute", "kind: gpu", "must be one of compute, training_data"),
        ("review: auto", "review: sometimes", "must be one of auto, manual"),
        (
            "valid_days: 365",
            "valid_days: true",
            "whole number > 0, not true (a boolean)",
        ),
        (
            "{min: 1000, max: 100000}",
            "{min: 5000, max: 1000}",
            "min 5000 is above max 1000",
        ),
        ("voucher_prefix: TC", "voucher_prefix: tc1", "does not match"),
        ("datacenters: any", "datacenters: everywhere", "must be any, a list of ids"),
    ],
)
def test_invalid_file_names_line_and_problem(tmp_path, old, new, problem):
    assert old in VALID
    text = VALID.replace(old, new, 1)
    # The line of the last line of the replacement: where the problem is.
    line = text[: text.index(new) + len(new.rstrip("\n"))].count("\n") + 1
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as err:
        load_rules(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert problem in message
    assert "\n" not in message


def test_missing_key_and_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RulesError, match="missing required key 'region'"):
        parse_rules(VALID.replace("region: east\n", "").encode())
    with pytest.raises(RulesError, match=r"x.yaml:\d+: not valid YAML"):
        parse_rules(b"city: [unclosed\n", "x.yaml")
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "nope.yaml")
    with pytest.raises(RulesError, match="empty"):
        parse_rules(b"")


def test_bonus_conditions_are_checked():
    bad = VALID + "    bonuses:\n      - when: {sunny: true}\n        add_percent: 5\n"
    with pytest.raises(RulesError, match=r":19: .*unknown condition 'sunny'"):
        parse_rules(bad.encode(), "x.yaml")
    bad = (
        VALID
        + "    bonuses:\n      - when: {chip_origin: martian}\n        add_percent: 5\n"
    )
    with pytest.raises(RulesError, match="chip_origin takes domestic or imported"):
        parse_rules(bad.encode())


def test_rules_of_another_city_are_refused(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(VALID)
    with pytest.raises(
        RulesError, match="city is 'testcity' but this instance is 'other'"
    ):
        load_rules(path, "other")


# -- the voucher prefix: optional in the file, reserved by the registry ------

WITHOUT_PREFIX = VALID.replace("voucher_prefix: TC\n", "")


def _file(tmp_path, text):
    path = tmp_path / "testcity.yaml"
    path.write_text(text)
    return path


def test_a_file_without_voucher_prefix_is_valid():
    assert parse_rules(WITHOUT_PREFIX.encode()).voucher_prefix is None


def test_the_service_runs_on_the_prefix_the_registry_reserved(tmp_path):
    path = _file(tmp_path, WITHOUT_PREFIX)
    assert instance_rules(path, "testcity", "TCY").voucher_prefix == "TCY"


def test_a_file_naming_the_reserved_prefix_is_accepted(tmp_path):
    path = _file(tmp_path, VALID)
    assert instance_rules(path, "testcity", "TC").voucher_prefix == "TC"
    # Without VOUCHER_PREFIX, the file's own (a preset of `make run`).
    assert instance_rules(path, "testcity", None).voucher_prefix == "TC"


def test_a_file_naming_another_prefix_stops_the_service(tmp_path):
    path = _file(tmp_path, VALID)
    with pytest.raises(RulesError) as err:
        instance_rules(path, "testcity", "SH")
    message = str(err.value)
    assert "voucher_prefix is 'TC'" in message
    assert "the registry reserved 'SH'" in message and "VOUCHER_PREFIX" in message


def test_no_prefix_anywhere_stops_the_service(tmp_path):
    path = _file(tmp_path, WITHOUT_PREFIX)
    with pytest.raises(RulesError, match="no voucher prefix for testcity"):
        instance_rules(path, "testcity", None)


def test_a_malformed_voucher_prefix_setting_is_refused(tmp_path):
    path = _file(tmp_path, WITHOUT_PREFIX)
    with pytest.raises(RulesError, match="VOUCHER_PREFIX 'sh1' is not"):
        instance_rules(path, "testcity", "sh1")
