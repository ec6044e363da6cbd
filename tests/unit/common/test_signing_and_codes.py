import random

import pytest

from services.common import signing, vouchercode


def test_signature_covers_the_exact_bytes():
    secret = signing.new_secret()
    body = b'{"a":1}'
    signature = signing.sign(body, secret)
    assert signature == signature.lower() and len(signature) == 64
    assert signing.verify(body, secret, signature)
    assert signing.verify(body, secret, signature.upper())
    assert not signing.verify(b'{"a": 1}', secret, signature)
    assert not signing.verify(body, "other", signature)
    assert not signing.verify(body, secret, None)


def test_generated_codes_parse_to_their_prefix():
    for prefix in ("SH", "CD", "SD"):
        code = vouchercode.generate(prefix)
        assert vouchercode.parse(code) == prefix
        assert len(code) == len(prefix) + 1 + 12 + 2


def test_every_single_substitution_is_caught():
    code = vouchercode.generate("SH")
    prefix, body, check = code.split("-")
    for position in range(len(body)):
        for char in vouchercode.ALPHABET:
            if char == body[position]:
                continue
            typo = body[:position] + char + body[position + 1 :]
            with pytest.raises(vouchercode.InvalidVoucherCode):
                vouchercode.parse(f"{prefix}-{typo}-{check}")


def test_almost_every_adjacent_transposition_is_caught():
    """The hybrid MOD 37,36 system misses a few swaps of neighbouring values
    (about 0.2 % of them; a code with one is 1 in 60), so this counts over a
    fixed sample of codes rather than asserting on one random code, which
    failed about one run in sixty."""
    rng = random.Random(20261205)
    swaps = missed = 0
    for _ in range(2000):
        body = "".join(rng.choice(vouchercode.ALPHABET) for _ in range(12))
        check = vouchercode._check_char("SD" + body)
        for i in range(len(body) - 1):
            if body[i] == body[i + 1]:
                continue
            swapped = body[:i] + body[i + 1] + body[i] + body[i + 2 :]
            swaps += 1
            try:
                vouchercode.parse(f"SD-{swapped}-{check}")
            except vouchercode.InvalidVoucherCode:
                continue
            missed += 1
    assert swaps > 20_000
    assert missed / swaps < 0.005


@pytest.mark.parametrize("bad", ["", "SH", "SH-123", "sh_ABCDEFGHIJKL_1", 42, None])
def test_malformed_codes_are_rejected(bad):
    with pytest.raises(vouchercode.InvalidVoucherCode):
        vouchercode.parse(bad)
