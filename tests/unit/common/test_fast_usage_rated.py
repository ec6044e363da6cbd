"""The hand-written loader of usage_rated decides and returns exactly what the
schema does: where it returns a dict the schema accepts with the same dict;
where it returns None the caller asks the schema."""

from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from services.common.contracts import UsageRatedSchema, fast_load_usage_rated

SCHEMA = UsageRatedSchema()


def valid_body(**overrides):
    body = {
        "event_id": "e-1",
        "city": "shanghai",
        "occurred_at": "2026-11-22T08:00:00Z",
        "record_id": "r-1",
        "datacenter_id": "guian-gov-01",
        "tenant_id": "t-1",
        "voucher_code": "SH-AAAAAAAAAAAA-1",
        "gpu_model": "H800",
        "gpu_count": 8,
        "started_at": "2026-11-22T06:00:00Z",
        "ended_at": "2026-11-22T07:00:00Z",
        "gpu_seconds": 28800,
        "source": "slurm",
        "job_id": "42",
        "correction_of": None,
        "cost_fen": 14400,
        "unit_price_fen_per_gpu_hour": 1800,
        "datacenter": {
            "government_run": True,
            "hub_region": "west",
            "chip_origin": "domestic",
        },
        "extension_field": "ignored",
    }
    body.update(overrides)
    return body


def agree(body):
    fast = fast_load_usage_rated(body)
    try:
        slow = SCHEMA.load(body)
    except ValidationError:
        slow = None
    if fast is not None:
        assert slow == fast
    return fast, slow


def test_a_valid_body_takes_the_fast_path():
    fast, slow = agree(valid_body())
    assert fast is not None and fast == slow
    fast, slow = agree(
        valid_body(datacenter={**valid_body()["datacenter"], "utilisation": 0.25})
    )
    assert fast == slow and fast["datacenter"]["utilisation"] == 0.25


MUTATIONS = st.sampled_from(
    [
        None,
        "",
        "x" * 200,
        0,
        -1,
        1,
        2**40,
        1.5,
        True,
        False,
        [],
        {},
        "2026-13-01T00:00:00Z",
        "2026-11-22T07:00:00",
        "Bad City",
        "domestic",
        "imported",
        float("nan"),
    ]
)
FIELDS = st.sampled_from(
    [name for name in valid_body() if name != "datacenter"]
    + [
        "datacenter.government_run",
        "datacenter.hub_region",
        "datacenter.chip_origin",
        "datacenter.utilisation",
        "datacenter",
    ]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(FIELDS, MUTATIONS | st.just("<delete>")), max_size=3))
def test_mutated_bodies_agree_with_the_schema(mutations):
    body = valid_body()
    body["datacenter"] = dict(body["datacenter"])
    for field, value in mutations:
        target, key = (
            (body["datacenter"], field.split(".")[1])
            if field.startswith("datacenter.")
            and isinstance(body.get("datacenter"), dict)
            else (body, field)
        )
        if field.startswith("datacenter.") and target is body:
            continue
        if value == "<delete>":
            target.pop(key, None)
        else:
            target[key] = value
    agree(body)
