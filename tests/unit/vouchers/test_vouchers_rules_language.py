"""The whole rules language: predicates, bonuses, scopes, and the check command.

Every invalid file of the table yields its own message, naming the file, the
line and the problem.
"""

from datetime import date

import pytest

from services.vouchers import domain
from services.vouchers.rules import RulesError, check_files, main, parse_rules
from tests.support.vouchers_data import DEPLOY_CITIES as DEPLOY
from tests.support.vouchers_data import MINIMAL_RULES as VALID

EXTRA = VALID.replace(
    "    datacenters: any\n",
    "    bonuses:\n"
    "      - when: {government_run: true}\n"
    "        add_percent: 5\n"
    "    datacenters: any\n",
)


def _replaced(old: str, new: str, base: str = EXTRA) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


INVALID = [
    # (id, text, expected line, problem)
    ("unknown-top-key", "colour: red\n" + VALID, 1, "unknown key 'colour'"),
    (
        "missing-programs",
        VALID.split("programs:")[0],
        1,
        "missing required key 'programs'",
    ),
    ("empty-programs", VALID.split("programs:")[0] + "programs: []\n", 5, "non-empty"),
    (
        "bad-city-code",
        _replaced("city: testcity", "city: Test City"),
        1,
        "does not match ^[a-z0-9_]+$",
    ),
    (
        "budget-zero",
        _replaced("budget_cny: 1000000", "budget_cny: 0"),
        8,
        "budget must be a whole number of CNY > 0, not 0 (int)",
    ),
    (
        "budget-string",
        _replaced("budget_cny: 1000000", "budget_cny: '1M'"),
        8,
        "not '1M' (str)",
    ),
    (
        "rate-above-cap",
        _replaced("rate_percent: 80", "rate_percent: 95"),
        9,
        "rate_percent 95 is above max_rate_percent 90",
    ),
    (
        "rate-finer-than-bp",
        _replaced("rate_percent: 80", "rate_percent: 80.005"),
        9,
        "finer than a basis point",
    ),
    (
        "face-above-budget",
        _replaced("{min: 1000, max: 100000}", "{min: 1000, max: 2000000}"),
        11,
        "max 2000000 is above budget_cny 1000000",
    ),
    (
        "unknown-predicate",
        _replaced("registered_in: testcity", "headquartered_in: testcity"),
        16,
        "unknown predicate 'headquartered_in'",
    ),
    (
        "predicate-wrong-type",
        _replaced("registered_in: testcity", "founded_after: last year"),
        16,
        "founded_after takes a date (YYYY-MM-DD), not 'last year' (str)",
    ),
    (
        "sector-not-a-list",
        _replaced("registered_in: testcity", "sector_in: robotics"),
        16,
        "sector_in takes a non-empty list of sector names",
    ),
    (
        "empty-all-of",
        _replaced(
            "      all_of:\n        - registered_in: testcity\n", "      all_of: []\n"
        ),
        15,
        "all_of takes a non-empty list of rules",
    ),
    (
        "rule-with-two-keys",
        _replaced(
            "        - registered_in: testcity\n",
            "        - registered_in: testcity\n          max_employees: 3\n",
        ),
        16,
        "exactly one key",
    ),
    (
        "unknown-bonus-condition",
        _replaced("{government_run: true}", "{sunny: true}"),
        18,
        "unknown condition 'sunny'",
    ),
    (
        "bonus-utilisation-out-of-range",
        _replaced("{government_run: true}", "{utilisation_below_percent: 150}"),
        18,
        "utilisation_below_percent takes a percentage in (0, 100]",
    ),
    (
        "bonus-without-percent",
        _replaced("        add_percent: 5\n", ""),
        18,
        "missing required key 'add_percent'",
    ),
    (
        "scope-unknown-key",
        _replaced("datacenters: any", "datacenters: {continent: asia}"),
        20,
        "unknown key 'continent'",
    ),
    (
        "scope-government-run-type",
        _replaced("datacenters: any", "datacenters: {government_run: maybe}"),
        20,
        "takes true or false, not 'maybe' (str)",
    ),
    (
        "duplicate-program-id",
        EXTRA + EXTRA[EXTRA.index("  - id:") :],
        21,
        "duplicate program id 'tc-compute'",
    ),
    (
        "duplicate-key",
        _replaced("    valid_days: 365\n", "    valid_days: 365\n    valid_days: 30\n"),
        13,
        "duplicate key 'valid_days'",
    ),
    (
        "not-yaml",
        _replaced("    kind: compute", "    kind: compute\n   oops: [1"),
        8,
        "not valid YAML",
    ),
    ("not-a-mapping", "- just\n- a list\n", 1, "must be a mapping, not a list"),
]


@pytest.mark.parametrize(
    "text, line, problem", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_each_invalid_file_has_its_own_message(tmp_path, text, line, problem):
    path = tmp_path / "city.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as err:
        parse_rules(text.encode(), str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert problem in message, message
    # The check command says the same, and fails.
    out, errors = _Capture(), _Capture()
    assert check_files([str(path)], out, errors) == 1
    assert errors.text.strip() == message and out.text == ""


def test_the_table_is_long_and_its_messages_distinct():
    assert len(INVALID) >= 15
    assert len({c[3] for c in INVALID}) == len(INVALID)


class _Capture:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_check_command_on_the_presets(capsys):
    paths = sorted(str(p) for p in DEPLOY.glob("*.yaml"))
    assert main(["check", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths) >= 7
    shanghai = next(line for line in lines if "shanghai" in line)
    assert shanghai.startswith("ok: ") and "(2 programs, rules version " in shanghai


def test_presets_name_their_prefixes():
    prefixes = {
        p.stem: parse_rules(p.read_bytes(), str(p)).voucher_prefix
        for p in DEPLOY.glob("*.yaml")
    }
    assert {
        "beijing": "BJ",
        "henan": "HA",
        "shenzhen": "SZ",
        "ningbo": "NB",
        "shanghai": "SH",
        "chengdu": "CD",
        "shandong": "SD",
    }.items() <= prefixes.items()
    for name in ("beijing", "henan", "shenzhen", "ningbo"):
        assert "illustrative" in (DEPLOY / f"{name}.yaml").read_text()


def _program(eligibility: str, extra: str = "") -> domain.Program:
    text = VALID.replace(
        "      all_of:\n        - registered_in: testcity\n", eligibility
    ).replace("    datacenters: any\n", extra or "    datacenters: any\n")
    return parse_rules(text.encode()).programs[0]


@pytest.mark.parametrize(
    "rule, company, passed",
    [
        ("min_employees: 10", {"employees": 10}, True),
        ("min_employees: 10", {"employees": 9}, False),
        ("max_annual_revenue_cny: 100", {"annual_revenue_cny": 101}, False),
        ("sector_in: [robotics, ai_chips]", {"sector": "Robotics"}, True),
        ("sector_in: [robotics]", {"sector": "retail"}, False),
        ("sector_in: [robotics]", {}, False),
        ("founded_after: 2020-01-01", {"founded_on": date(2021, 5, 1)}, True),
        ("founded_after: 2020-01-01", {"founded_on": "2019-12-31"}, False),
        ("founded_before: 2020-01-01", {"founded_on": "2019-12-31"}, True),
        ("founded_before: 2020-01-01", {}, False),
    ],
)
def test_predicates(rule, company, passed):
    program = _program(f"      {rule}\n")
    verdict = domain.evaluate(program.eligibility, company)
    assert verdict.passed is passed
    assert verdict.reasons[0].rule == rule


def test_not_inverts_and_explains():
    program = _program("      not:\n        sector_in: [mining]\n")
    verdict = domain.evaluate(program.eligibility, {"sector": "mining"})
    assert not verdict.passed
    assert [r.rule for r in verdict.reasons] == ["not", "sector_in: [mining]"]
    assert verdict.reasons[0].evidence == "inner rule passed"


def test_bonuses_and_the_cap():
    program = _program(
        "      min_employees: 0\n",
        "    bonuses:\n"
        "      - when: {chip_origin: domestic}\n"
        "        add_percent: 5\n"
        "      - when: {utilisation_below_percent: 30}\n"
        "        add_percent: 5\n"
        "      - when: {hub_region: west, government_run: true}\n"
        "        add_percent: 20\n"
        "    datacenters: any\n",
    )
    east = {"government_run": False, "hub_region": "east", "chip_origin": "imported"}
    assert domain.effective_rate_bp(program, east) == 8000
    assert (
        domain.effective_rate_bp(program, {**east, "chip_origin": "domestic"}) == 8500
    )
    # Utilisation: missing → not applicable; 0.2 → applies; 0.3 → not below.
    assert domain.effective_rate_bp(program, {**east, "utilisation": 0.2}) == 8500
    assert domain.effective_rate_bp(program, {**east, "utilisation": 0.3}) == 8000
    west = {"government_run": True, "hub_region": "west", "chip_origin": "domestic"}
    assert domain.effective_rate_bp(program, west) == 9000  # capped at 90 %


def test_datacenter_restrictions():
    program = _program(
        "      min_employees: 0\n",
        "    datacenters: {government_run: true, exclude: [dc-bad]}\n",
    )
    gov = {"government_run": True, "hub_region": "west", "chip_origin": "imported"}
    assert program.datacenters.admits("dc-a", gov)
    assert not program.datacenters.admits("dc-bad", gov)
    assert not program.datacenters.admits("dc-a", {**gov, "government_run": False})
    chips = _program(
        "      min_employees: 0\n", "    datacenters: {chip_origin: domestic}\n"
    )
    assert not chips.datacenters.admits("dc-a", gov)


def test_subsidy_arithmetic():
    assert domain.subsidy_fen(1001, 8000, 10_000, 10_000) == 800  # rounded down
    assert domain.subsidy_fen(1000, 8000, 500, 10_000) == 500  # the balance
    assert domain.subsidy_fen(1000, 8000, 10_000, 100) == 100  # the commitment
    assert domain.subsidy_fen(0, 8000, 10_000, 10_000) == 0
    with pytest.raises(ValueError):
        domain.subsidy_fen(-1, 8000, 1, 1)
