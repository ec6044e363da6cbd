"""Unified social credit codes (GB 32100-2015): the check character."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common import creditcode
from services.common.creditcode import ALPHABET, InvalidCreditCode

# Published codes of real companies (their check characters as printed).
REAL = ["91350100M000100Y43", "91110108551385082Q"]


@pytest.mark.parametrize("code", REAL)
def test_published_codes_pass(code):
    assert creditcode.parse(code) == code
    assert creditcode.parse(f"  {code.lower()} ") == code


@given(st.integers(0, 10**9 - 1), st.sampled_from(["310000", "510100", "370000"]))
def test_every_completed_code_parses(n, division):
    code = creditcode.complete(f"91{division}{n:09d}")
    assert creditcode.parse(code) == code


@given(st.randoms(use_true_random=False), st.integers(0, 16), st.data())
def test_one_changed_character_is_caught(rng, position, data):
    code = creditcode.generate(rng=random.Random(rng.random()))
    if 2 <= position < 8:  # the division: digits only
        other = data.draw(
            st.sampled_from("0123456789").filter(lambda c: c != code[position])
        )
    else:
        other = data.draw(
            st.sampled_from(ALPHABET).filter(lambda c: c != code[position])
        )
    mistyped = code[:position] + other + code[position + 1 :]
    with pytest.raises(InvalidCreditCode, match="check character"):
        creditcode.parse(mistyped)


@pytest.mark.parametrize(
    "code, says",
    [
        ("91350100M000100Y4", "18 characters, not 17"),
        ("91350100M000100Y433", "18 characters, not 19"),
        ("91350100M0001O0Y43", "'O' cannot stand"),
        ("913501A0M000100Y43", "six digits"),
        ("91350100M000100Y44", "check character is '4', but the first 17"),
        (None, "is a string"),
    ],
)
def test_a_wrong_code_says_what_is_wrong(code, says):
    with pytest.raises(InvalidCreditCode, match=says):
        creditcode.parse(code)
