"""metering's rules without a broker or a database: validation, rating, rollups."""

from datetime import UTC, datetime, timedelta

import pytest

from services.common import signing
from services.common.contracts import canonical_json, load_event
from services.common.units import format_ts, parse_ts
from services.metering.domain import encoding, rating, rollups, validation
from services.metering.domain.validation import Reason, Refused
from tests.support import metering_reference as reference
from tests.support.metering_data import (
    DATACENTER,
    DATACENTER_ID,
    KEY_ID,
    SECRET,
    usage,
    voucher,
)

KEYS = {KEY_ID: SECRET}


def refused_reason(call, *args) -> str:
    with pytest.raises(Refused) as caught:
        call(*args)
    return caught.value.reason


def loaded(**overrides):
    return validation.load_usage(usage(**overrides), DATACENTER_ID)


def test_split_routing_key_names_the_datacenter_and_the_kind():
    assert validation.split_routing_key("guian-gov-01.usage") == (
        "guian-gov-01",
        "usage",
    )
    assert validation.split_routing_key("x.capacity") == ("x", "capacity")
    assert validation.split_routing_key("") == ("", "")


def test_envelope_accepts_json_up_to_64_kib():
    validation.check_envelope(b"{}", "application/json")
    validation.check_envelope(
        b"x" * validation.MAX_BODY_BYTES, "application/json; charset=utf-8"
    )


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"x" * (validation.MAX_BODY_BYTES + 1), "application/json"),
        (b"{}", "text/plain"),
        (b"{}", None),
    ],
)
def test_envelope_refuses_oversized_or_non_json_content_as_schema(body, content_type):
    assert (
        refused_reason(validation.check_envelope, body, content_type) == Reason.SCHEMA
    )


def test_signature_of_an_active_key_is_accepted():
    body = b'{"a":1}'
    headers = {"x-key-id": KEY_ID, "x-signature": signing.sign(body, SECRET)}
    validation.check_signature(body, headers, KEYS)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-key-id": KEY_ID},
        {"x-key-id": KEY_ID, "x-signature": "00" * 32},
        {"x-key-id": "revoked-key", "x-signature": signing.sign(b'{"a":1}', SECRET)},
        {"x-key-id": KEY_ID, "x-signature": signing.sign(b'{"a":2}', SECRET)},
        {"x-key-id": KEY_ID, "x-signature": 42},
    ],
)
def test_missing_unknown_or_wrong_signature_is_bad_signature(headers):
    assert (
        refused_reason(validation.check_signature, b'{"a":1}', headers, KEYS)
        == Reason.BAD_SIGNATURE
    )


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'"a string"',
        b"[" * 100_000,
        b'{"tenant_id": "a\\u0000b"}',
        b'{"tenant_id": "\\ud800"}',
    ],
)
def test_unparseable_or_unstorable_body_is_schema(body):
    assert refused_reason(validation.parse_body, body) == Reason.SCHEMA


def test_record_loads_with_aware_utc_times():
    record = loaded()
    assert record["started_at"].tzinfo is not None
    assert record["gpu_seconds"] == 7200


@pytest.mark.parametrize(
    "overrides",
    [
        {"gpu_count": 0},
        {"gpu_count": "2"},
        {"gpu_count": validation.MAX_GPU_COUNT + 1, "gpu_seconds": 1},
        {"gpu_seconds": -1},
        {"gpu_seconds": 2 * 3600 + 1},
        {"record_id": ""},
        {"record_id": "r" * 129},
        {"started_at": "2025-01-01T00:00:00"},
        {"ended_at": "2020-01-01T00:00:00Z"},
        {"unexpected_field": 1},
    ],
)
def test_record_breaking_the_contract_is_schema(overrides):
    with pytest.raises(Refused) as caught:
        loaded(**overrides)
    assert caught.value.reason == Reason.SCHEMA
    assert caught.value.detail  # marshmallow's messages, for the operator


def test_missing_field_is_schema_with_the_field_named():
    data = usage()
    del data["tenant_id"]
    with pytest.raises(Refused) as caught:
        validation.load_usage(data, DATACENTER_ID)
    assert "tenant_id" in caught.value.detail


def test_record_of_another_datacenter_is_a_mismatch():
    with pytest.raises(Refused) as caught:
        validation.load_usage(usage(datacenter_id="lingang-com-01"), DATACENTER_ID)
    assert caught.value.reason == Reason.DATACENTER_MISMATCH


def test_gpu_model_outside_the_inventory_is_unknown():
    assert (
        refused_reason(reference.rate, loaded(gpu_model="B200"), DATACENTER)
        == Reason.UNKNOWN_GPU_MODEL
    )


def test_voucher_prefix_of_a_valid_code():
    assert validation.voucher_prefix(voucher("SH")) == "SH"


def mistyped(code: str) -> str:
    """The code with one character of its body changed: the check catches it."""
    body_start = code.index("-") + 1
    char = code[body_start]
    return code[:body_start] + ("B" if char != "B" else "C") + code[body_start + 1 :]


@pytest.mark.parametrize(
    "code", ["", "SH-1234", "SH1234567890123", mistyped(voucher("SH")), "x" * 300]
)
def test_malformed_or_mistyped_voucher_is_unknown(code):
    assert refused_reason(validation.voucher_prefix, code) == Reason.UNKNOWN_VOUCHER


def test_unknown_prefix_is_unknown_voucher():
    assert validation.unknown_prefix("ZZ").reason == Reason.UNKNOWN_VOUCHER


@pytest.mark.parametrize(
    "gpu_seconds, price, cost",
    [
        (3600, 1800, 1800),
        (1, 1800, 1),  # 0.5 fen rounds half up
        (1, 1799, 0),  # 0.4997 fen rounds down
        (2, 900, 1),  # 0.5 exactly
        (7, 900, 2),  # 1.75 → 2
        (0, 3200, 0),
        (86_400 * 8, 3200, 614_400),
    ],
)
def test_cost_is_rounded_half_up_once_per_record(gpu_seconds, price, cost):
    datacenter = {
        **DATACENTER,
        "inventory": [
            {
                "gpu_model": "H800",
                "chip_origin": "imported",
                "price_fen_per_gpu_hour": price,
            }
        ],
    }
    ended = parse_ts(usage()["ended_at"])
    record = loaded(
        gpu_seconds=gpu_seconds,
        gpu_count=8,
        started_at=format_ts(ended - timedelta(days=1)),
    )
    rating = reference.rate(record, datacenter)
    assert rating.cost_fen == cost
    assert rating.unit_price_fen_per_gpu_hour == price


@pytest.mark.parametrize(
    "gpu_model, gpu_count, refused",
    [("H800", 256, False), ("H800", 257, True), ("Ascend-910B", 512, False)],
)
def test_a_record_holds_at_most_the_registered_gpus(gpu_model, gpu_count, refused):
    terms = rating.model_terms(DATACENTER, gpu_model)
    assert terms[:4] == rating.price_terms(DATACENTER, gpu_model)
    registered = terms[4]
    assert registered == rating.registered_gpus(DATACENTER, gpu_model)
    try:
        rating.check_inventory(gpu_count, registered, DATACENTER_ID, gpu_model)
    except Refused as exc:
        assert refused and exc.reason == Reason.EXCEEDS_INVENTORY
        assert str(registered) in exc.detail_text
    else:
        assert not refused


def test_a_model_registered_without_a_count_holds_no_record():
    datacenter = {**DATACENTER, "inventory": [{"gpu_model": "H800"}]}
    assert rating.registered_gpus(datacenter, "H800") == 0
    with pytest.raises(Refused) as refused:
        rating.check_inventory(1, 0, DATACENTER_ID, "H800")
    assert refused.value.reason == Reason.EXCEEDS_INVENTORY


def test_rating_carries_the_attributes_city_rules_use():
    rating = reference.rate(loaded(gpu_model="Ascend-910B"), DATACENTER)
    assert rating.datacenter == {
        "government_run": True,
        "hub_region": "west",
        "chip_origin": "domestic",
    }
    assert rating.cost_fen == 2 * 1100


def test_canonical_digest_ignores_spelling_but_not_content():
    data = usage()
    same = dict(reversed(list(data.items())))
    same["started_at"] = data["started_at"].replace("Z", "+00:00")
    assert encoding.canonical_sha256(
        validation.load_usage(data, DATACENTER_ID)
    ) == encoding.canonical_sha256(validation.load_usage(same, DATACENTER_ID))
    other = dict(data, gpu_seconds=data["gpu_seconds"] - 1)
    assert encoding.canonical_sha256(
        validation.load_usage(data, DATACENTER_ID)
    ) != encoding.canonical_sha256(validation.load_usage(other, DATACENTER_ID))


def test_usage_rated_event_is_deterministic_and_valid():
    record = loaded(voucher_code=voucher("SH"))
    rating = reference.rate(record, DATACENTER)
    rated_at = datetime(2025, 1, 1, 12, tzinfo=UTC)
    first = reference.usage_rated_event(record, "shanghai", rating, rated_at)
    again = reference.usage_rated_event(record, "shanghai", rating, rated_at)
    assert canonical_json(first) == canonical_json(again)
    assert first["event_id"] == encoding.usage_rated_event_id(
        DATACENTER_ID, record["record_id"]
    )
    assert first["occurred_at"] == "2025-01-01T12:00:00Z"
    event = load_event("usage_rated", first)
    assert event["cost_fen"] == 2 * 1800
    assert event["datacenter"]["chip_origin"] == "imported"


def test_hour_of_truncates_to_the_utc_hour():
    moment = datetime(2025, 3, 1, 13, 59, 59, tzinfo=UTC)
    assert rollups.hour_of(moment) == datetime(2025, 3, 1, 13, tzinfo=UTC)


T0 = datetime(2025, 1, 1, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_capacity_counts_each_report_until_the_next_but_at_most_300_s():
    reports = [(at(0), 10), (at(100), 20), (at(1000), 5)]
    # 10×100 + 20×300 (gap of 900 capped) + 5×min(now−1000, 300)
    assert rollups.capacity_gpu_seconds(reports, at(0), at(1100)) == 1000 + 6000 + 500
    assert rollups.capacity_gpu_seconds(reports, at(0), at(5000)) == 1000 + 6000 + 1500


def test_capacity_only_counts_the_part_inside_the_window():
    reports = [(at(-200), 10), (at(0), 10)]
    assert (
        rollups.capacity_gpu_seconds(reports, at(-100), at(300)) == 10 * 100 + 10 * 300
    )


def test_capacity_without_reports_is_zero_and_utilisation_null():
    assert rollups.capacity_gpu_seconds([], at(0), at(100)) == 0
    assert rollups.utilisation(100, 0) is None
    assert rollups.utilisation(50, 200) == 0.25
    assert rollups.utilisation(300, 200) == 1.0


def test_capacity_report_loads_and_checks_the_datacenter():
    report = validation.load_capacity(
        {
            "datacenter_id": DATACENTER_ID,
            "reported_at": "2025-01-01T00:00:00Z",
            "gpus": [{"model": "H800", "total": 8, "allocated": 2}],
        },
        DATACENTER_ID,
    )
    assert report["gpus"][0]["total"] == 8
    with pytest.raises(Refused) as caught:
        validation.load_capacity({"datacenter_id": DATACENTER_ID}, DATACENTER_ID)
    assert caught.value.reason == Reason.SCHEMA


def test_readable_record_id_only_when_the_body_has_one():
    assert validation.readable_record_id(b'{"record_id": "r-1"}') == "r-1"
    assert validation.readable_record_id(b"junk") is None
    assert validation.readable_record_id(b'{"record_id": 5}') is None


def test_a_refused_voucher_code_is_refused_every_time():
    code = voucher("SH")
    mistyped = code[:-1] + ("0" if code[-1] != "0" else "1")
    for _ in range(2):  # the second time from the cache (errors are not cached)
        assert validation.voucher_prefix(code) == "SH"
        assert refused_reason(validation.voucher_prefix, mistyped) == "unknown_voucher"
