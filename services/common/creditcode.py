"""Unified social credit codes (GB 32100-2015): a company's one identity.

Eighteen characters from 31 (digits and capitals without I, O, S, V, Z): the
registration authority (1), the kind of entity (1), the administrative
division (6 digits), the organisation code (9), and a check character over
the first seventeen (weights 3^i mod 31; 31 − sum mod 31, where 31 is 0). A
mistyped code is refused by its check character before any lookup, as a
voucher code is (``vouchercode.py``).
"""

from __future__ import annotations

import random

ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_VALUE = {char: value for value, char in enumerate(ALPHABET)}
_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
LENGTH = 18


class InvalidCreditCode(ValueError):
    """Not a unified social credit code; the message says what is wrong."""


def check_character(first17: str) -> str:
    """The check character of the code's first seventeen characters."""
    pairs = zip(first17, _WEIGHTS, strict=True)
    total = sum(_VALUE[char] * weight for char, weight in pairs)
    return ALPHABET[(31 - total % 31) % 31]


def parse(code: object) -> str:
    """The code, upper-cased and trimmed, or :class:`InvalidCreditCode`."""
    if not isinstance(code, str):
        raise InvalidCreditCode("a unified social credit code is a string")
    text = code.strip().upper()
    if len(text) != LENGTH:
        raise InvalidCreditCode(
            f"a unified social credit code has {LENGTH} characters, not {len(text)}"
        )
    wrong = sorted({char for char in text if char not in _VALUE})
    if wrong:
        raise InvalidCreditCode(
            f"{''.join(wrong)!r} cannot stand in a unified social credit code "
            "(digits and capitals without I, O, S, V, Z)"
        )
    if not text[2:8].isdigit():
        raise InvalidCreditCode(
            "characters 3 to 8 of a unified social credit code are the "
            "administrative division, six digits"
        )
    expected = check_character(text[:17])
    if text[17] != expected:
        raise InvalidCreditCode(
            f"the check character is {text[17]!r}, but the first 17 characters "
            f"give {expected!r}: the code is mistyped"
        )
    return text


def complete(first17: str) -> str:
    """``first17`` and its check character (demo and test data)."""
    return first17 + check_character(first17)


def generate(division: str = "310000", rng: random.Random | None = None) -> str:
    """A well-formed code of a company (kind 91) in ``division`` (tests, demos)."""
    rng = rng or random.SystemRandom()
    organisation = "".join(rng.choice(ALPHABET) for _ in range(9))
    first17 = f"91{division}{organisation}"
    return first17 + check_character(first17)
