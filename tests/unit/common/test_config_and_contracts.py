from datetime import UTC, datetime, timedelta

import pytest
from marshmallow import ValidationError

from services.common import contracts
from services.common.config import ConfigError, load_config, substitute


def test_substitution_uses_env_then_default_and_nests():
    env = {"CITY_CODE": "chengdu"}
    text = "url: ${DATABASE_URL:sqlite:///var/vouchers_${CITY_CODE}.db}"
    assert substitute(text, env) == "url: sqlite:///var/vouchers_chengdu.db"
    assert (
        substitute(text, {**env, "DATABASE_URL": "postgresql://x/y"})
        == "url: postgresql://x/y"
    )
    with pytest.raises(ConfigError, match="CITY_CODE"):
        substitute("code: ${CITY_CODE}", {})


def test_config_files_of_every_process_load(tmp_path):
    env = {
        "CITY_CODE": "shanghai",
        "DATACENTER_ID": "x",
        "KEY_ID": "k",
        "KEY_SECRET": "s",
    }
    for name in (
        "city_registry",
        "metering",
        "vouchers",
        "datacenter_gateway",
        "gateway",
    ):
        config = load_config(f"deploy/config/{name}.yaml", env)
        assert config["AMQP_URI"].startswith("amqp://")
    assert load_config("deploy/config/vouchers.yaml", env)["DATABASE_URL"].endswith(
        "vouchers_shanghai.db"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, {})


# Values that would change a YAML document if pasted into its text.
AWKWARD_VALUES = [
    "#x",
    "a: b",
    "x #y",
    "line one\nline two: 2",
    "{a: 1}",
    "[1, 2]",
    "'quoted'",
    '"quoted"',
    "it's",
    "- item",
    "&anchor *alias !tag | >",
    "${DATACENTER_ID}",  # a value is not substituted again
]


def test_no_environment_value_changes_the_document(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "# the data centre: ${NOT_SET} in a comment is not substituted\n"
        "TOKEN: ${AGENT_TOKEN:}\n"
        "QUOTED: '${AGENT_TOKEN}'\n"
        'DOUBLE: "${AGENT_TOKEN}"\n'
        "LONGER: token=${AGENT_TOKEN}.\n"
        "NESTED:\n"
        "  inner: ${AGENT_TOKEN}\n"
        "  list:\n"
        "    - ${AGENT_TOKEN}\n"
        "AFTER: 1\n"
    )
    for value in AWKWARD_VALUES:
        config = load_config(path, {"AGENT_TOKEN": value, "DATACENTER_ID": "x"})
        assert config == {
            "TOKEN": value,
            "QUOTED": value,
            "DOUBLE": value,
            "LONGER": f"token={value}.",
            "NESTED": {"inner": value, "list": [value]},
            "AFTER": 1,
        }, value


def test_the_agent_tokens_hash_is_a_token_not_a_comment():
    env = {"DATACENTER_ID": "x", "KEY_ID": "k", "KEY_SECRET": "s"}
    config = load_config(
        "deploy/config/datacenter_gateway.yaml", {**env, "AGENT_TOKEN": "#x"}
    )
    assert config["AGENT_TOKEN"] == "#x"
    assert (
        load_config("deploy/config/datacenter_gateway.yaml", env)["AGENT_TOKEN"] is None
    )


def test_a_whole_reference_is_typed_as_yaml_types_its_value(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "PORT: ${HTTP_PORT:8101}\n"
        "RATIO: ${RATIO:0.25}\n"
        "ENABLED: ${ENABLED:true}\n"
        "EMPTY: ${EMPTY:}\n"
        "FROM: ${NEXT_KEY_FROM:2026-01-01T00:00:00Z}\n"
        "TEXT: ${NAME:guian-gov-01}\n"
        "QUOTED: '${HTTP_PORT:8101}'\n"
        "LONGER: ${HTTP_PORT:8101}${HTTP_PORT:8101}\n"
        "URL: ${DATABASE_URL:sqlite:///var/dcgw_${DATACENTER_ID}.db}\n"
    )
    config = load_config(path, {"DATACENTER_ID": "dc"})
    assert config == {
        "PORT": 8101,
        "RATIO": 0.25,
        "ENABLED": True,
        "EMPTY": None,
        "FROM": datetime(2026, 1, 1, tzinfo=UTC),
        "TEXT": "guian-gov-01",
        "QUOTED": "8101",
        "LONGER": "81018101",
        "URL": "sqlite:///var/dcgw_dc.db",
    }
    typed = load_config(
        path, {"DATACENTER_ID": "dc", "HTTP_PORT": "9000", "ENABLED": "no"}
    )
    assert (typed["PORT"], typed["ENABLED"], typed["QUOTED"]) == (9000, False, "9000")
    with pytest.raises(ConfigError, match="DATACENTER_ID"):
        load_config(path, {})


def test_what_is_not_a_reference_is_left_as_text():
    for text in ("$A", "${}", "${a b}", "${A", "${A:x$y}", "${A:{x}}"):
        assert substitute(text, {}) == text
    assert substitute("$${A}", {"A": "a"}) == "$a"
    assert substitute("${A:{${A}}}", {"A": "a"}) == "${A:{a}}"


def record(**overrides):
    now = datetime.now(UTC).replace(microsecond=0)
    base = {
        "record_id": "r-1",
        "datacenter_id": "guian-gov-01",
        "tenant_id": "t",
        "voucher_code": None,
        "gpu_model": "H800",
        "gpu_count": 2,
        "started_at": (now - timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
        "ended_at": now.isoformat().replace("+00:00", "Z"),
        "gpu_seconds": 7200,
        "source": "slurm",
        "job_id": None,
        "correction_of": None,
    }
    base.update(overrides)
    return base


def test_a_valid_record_round_trips():
    loaded = contracts.UsageRecordSchema().load(record())
    assert contracts.UsageRecordSchema().load(contracts.dump_record(loaded)) == loaded


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"record_id": ""}, "record_id"),
        ({"record_id": "x" * 129}, "record_id"),
        ({"gpu_count": 0}, "gpu_count"),
        ({"gpu_count": "2"}, "gpu_count"),
        ({"gpu_seconds": -1}, "gpu_seconds"),
        ({"gpu_seconds": 7201}, "gpu_seconds"),
        ({"ended_at": "2020-01-01T00:00:00Z"}, "ended_at"),
        ({"started_at": "yesterday"}, "started_at"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_each_usage_rule_is_enforced(overrides, field):
    with pytest.raises(ValidationError) as info:
        contracts.UsageRecordSchema().load(record(**overrides))
    assert field in info.value.messages


def test_future_and_over_long_spans_are_refused():
    now = datetime.now(UTC)
    future = (now + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(ValidationError):
        contracts.UsageRecordSchema().load(record(ended_at=future, gpu_seconds=0))
    long_ago = (now - timedelta(days=32)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(ValidationError):
        contracts.UsageRecordSchema().load(record(started_at=long_ago, gpu_seconds=0))


def test_events_have_deterministic_ids_and_validate():
    assert contracts.event_id("a", "b") == contracts.event_id("a", "b")
    assert contracts.event_id("a", "b") != contracts.event_id("ab")
    event = contracts.make_event(
        "voucher_issued",
        "shanghai",
        contracts.event_id("x"),
        voucher_code="SH-AAAAAAAAAAAA-1",
        program_id="p",
        face_value_fen=100,
        expires_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert event["expires_at"] == "2026-01-01T00:00:00Z"
    assert (
        contracts.load_event("voucher_issued", {**event, "extra": 1})["face_value_fen"]
        == 100
    )
    with pytest.raises(ValidationError):
        contracts.make_event("heartbeat", "Bad City", "e", version="1", uptime_s=1)


def test_canonical_json_is_stable():
    assert contracts.canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
