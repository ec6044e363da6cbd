"""Voucher prefixes, reserved at admission (issue 14, item 4).

The prefix of a voucher code names its city (CONTRACTS.md §4), and metering
routes ``usage_rated`` by it: whoever holds a prefix receives the usage billed
to its vouchers. So the registry assigns each city one unique prefix when it
admits it (or seeds it from deploy/), and never takes one from what a city
publishes: a city's events must carry its assigned prefix or are refused.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Collection, Iterator
from typing import Any

from services.common.errors import InvalidRequest
from services.common.vouchercode import PREFIX

_WORD = re.compile(r"[a-z]+")


def check_requested(prefix: Any) -> str | None:
    """A requested prefix as given (None: none asked for), or InvalidRequest."""
    if prefix is None:
        return None
    if not isinstance(prefix, str) or not PREFIX.match(prefix):
        raise InvalidRequest(
            "invalid_voucher_prefix",
            "voucher_prefix must be 2-4 capital letters A-Z",
            {"voucher_prefix": prefix},
        )
    return prefix


def candidates(code: str) -> Iterator[str]:
    """Prefixes for city ``code``, most telling first, every one valid.

    The initials of its words (``inner_mongolia`` → IM), then its first two,
    three, four letters (``shanghai`` → SH, SHA, SHAN), then the first two or
    three letters with a suffix letter (SHA…SHZ, SHAA…), then any prefix at
    all, so that a free one is always found while one is left.
    """
    words = _WORD.findall(code)
    letters = "".join(words).upper()
    initials = "".join(word[0] for word in words).upper()
    if 2 <= len(initials) <= 4:
        yield initials
    for length in (2, 3, 4):
        if len(letters) >= length:
            yield letters[:length]
    stems = [letters[:2], letters[:3]] if len(letters) >= 2 else [letters]
    if len(initials) >= 2:
        stems.insert(0, initials[:3])
    for stem in filter(None, stems):
        for suffix in string.ascii_uppercase:
            yield stem + suffix
    for length in (2, 3, 4):
        for chars in itertools.product(string.ascii_uppercase, repeat=length):
            yield "".join(chars)


def assign(code: str, requested: str | None, taken: Collection[str]) -> str:
    """The prefix to reserve for ``code``: ``requested`` if free, else the
    first free candidate. ``taken``: every prefix already reserved."""
    if requested is not None and requested not in taken:
        return requested
    for candidate in candidates(code):
        if candidate not in taken and PREFIX.match(candidate):
            return candidate
    raise RuntimeError("every voucher prefix is taken")  # 475 228 cities later
