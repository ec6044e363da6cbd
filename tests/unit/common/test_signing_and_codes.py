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


def test_adjacent_transpositions_are_caught():
    code = vouchercode.generate("SD")
    prefix, body, check = code.split("-")
    for i in range(len(body) - 1):
        if body[i] == body[i + 1]:
            continue
        swapped = body[:i] + body[i + 1] + body[i] + body[i + 2 :]
        with pytest.raises(vouchercode.InvalidVoucherCode):
            vouchercode.parse(f"{prefix}-{swapped}-{check}")


@pytest.mark.parametrize("bad", ["", "SH", "SH-123", "sh_ABCDEFGHIJKL_1", 42, None])
def test_malformed_codes_are_rejected(bad):
    with pytest.raises(vouchercode.InvalidVoucherCode):
        vouchercode.parse(bad)
