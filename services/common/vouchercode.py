"""Voucher codes (CONTRACTS.md §4): ``<PREFIX>-<12 base32 chars>-<check>``.

The prefix names the issuing city, so any service can route a code; the check
character (ISO 7064 mod 37,36 over the body) rejects a mistyped code before
any lookup.
"""

from __future__ import annotations

import re
import secrets

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32
_CHECK_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# A city's prefix: 2-4 capitals, unique in the network, assigned by the
# registry at admission (services/city_registry/domain/prefixes.py).
PREFIX_PATTERN = r"^[A-Z]{2,4}$"
PREFIX = re.compile(PREFIX_PATTERN)
_SHAPE = re.compile(r"^([A-Z]{2,4})-([A-Z2-7]{12})-([0-9A-Z])$")


class InvalidVoucherCode(ValueError):
    """The string is not a well-formed voucher code."""


def _check_char(text: str) -> str:
    # ISO 7064 MOD 37,36 (hybrid system): catches every single substitution
    # and all but about 0.2 % of adjacent transpositions (some swaps of
    # neighbouring values). Codes already issued carry this check character,
    # so a stronger system would need a new code version, not a new formula.
    m = 36
    product = m
    for char in text:
        value = _CHECK_ALPHABET.index(char) if char in _CHECK_ALPHABET else 0
        total = (product + value) % m or m
        product = (2 * total) % (m + 1)
    return _CHECK_ALPHABET[(m + 1 - product) % m]


def generate(prefix: str) -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(12))
    return f"{prefix}-{body}-{_check_char(prefix + body)}"


def parse(code: str) -> str:
    """Return the city prefix of a valid code, or raise InvalidVoucherCode."""
    if not isinstance(code, str):
        raise InvalidVoucherCode("voucher code must be a string")
    match = _SHAPE.match(code.strip().upper())
    if not match:
        raise InvalidVoucherCode(f"{code!r} is not of the form XX-XXXXXXXXXXXX-C")
    prefix, body, check = match.groups()
    if _check_char(prefix + body) != check:
        raise InvalidVoucherCode(
            f"{code!r}: check character does not match (mistyped?)"
        )
    return prefix
