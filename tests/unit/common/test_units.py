import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common import units


@pytest.mark.parametrize(
    ("gpu_seconds", "price", "expected"),
    [
        (3600, 1800, 1800),  # one GPU-hour at 18 CNY
        (1, 1800, 1),  # 0.5 fen rounds half up
        (1, 1799, 0),  # 0.4997 fen rounds down
        (0, 3200, 0),
        (5400, 3333, 5000),  # 4999.5 → 5000
    ],
)
def test_rate_cost_rounds_half_up_once_per_record(gpu_seconds, price, expected):
    assert units.rate_cost_fen(gpu_seconds, price) == expected


@given(st.integers(0, 10**9), st.integers(0, 10**6))
def test_rate_cost_is_within_half_a_fen_of_the_exact_cost(gpu_seconds, price):
    exact_times_3600 = gpu_seconds * price
    cost = units.rate_cost_fen(gpu_seconds, price)
    assert abs(cost * 3600 - exact_times_3600) <= 1800


@given(st.integers(0, 10**12), st.integers(0, 10_000))
def test_subsidy_never_exceeds_rate_times_cost(cost, rate_bp):
    subsidy = units.apply_rate_fen(cost, rate_bp)
    assert subsidy * 10_000 <= cost * rate_bp
    assert 0 <= subsidy <= cost


def test_money_conversions_and_formatting():
    assert units.cny_to_fen(600_000_000) == 60_000_000_000
    assert units.percent_to_bp(80) == 8000
    assert units.percent_to_bp(12.5) == 1250
    assert units.format_cny(123456789) == "CNY 1,234,567.89"
    assert units.format_cny(-5) == "-CNY 0.05"
    with pytest.raises(TypeError):
        units.cny_to_fen(1.5)
    with pytest.raises(ValueError):
        units.percent_to_bp(12.345)


def test_timestamps_are_utc_with_z():
    moment = units.parse_ts("2025-03-01T08:00:00+08:00")
    assert units.format_ts(moment) == "2025-03-01T00:00:00Z"
    with pytest.raises(ValueError):
        units.parse_ts("2025-03-01T08:00:00")


@given(st.integers(-(10**12), 10**12))
def test_an_amount_of_cny_is_the_fen_exactly(fen):
    # Printed without a float: equal to the float's two decimals where a
    # float is exact, and never off by a fen beyond that.
    text = units.format_cny_amount(fen)
    whole, cents = text.lstrip("-").split(".")
    assert (-1 if fen < 0 else 1) * (int(whole) * 100 + int(cents)) == fen
    if abs(fen) < 2**50:
        assert text == f"{fen / 100:.2f}"


def test_rates_and_requested_gpu_time_for_people():
    assert units.format_rate(8000) == "80 %"
    assert units.format_rate(550) == "5.5 %"
    assert units.format_rate(0) == "0 %"
    assert units.gpu_seconds_of(2, 3) == 21_600
    assert units.gpu_seconds_of(1, 0.01) == 36
