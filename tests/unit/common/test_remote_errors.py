"""computenet's errors cross RPC as themselves once ``remote_errors`` is loaded,
while ``errors`` itself stays free of nameko (tests/unit/test_layering.py)."""

import pytest
from nameko.exceptions import deserialize, serialize

import services.common.remote_errors  # noqa: F401 - what is tested
from services.common.errors import EXPECTED, ComputenetError


@pytest.mark.parametrize("exception_type", EXPECTED)
def test_an_expected_error_comes_back_as_itself(exception_type):
    sent = exception_type("some_code", "in words", {"key": "v"})
    received = deserialize(serialize(sent))
    assert type(received) is exception_type
    assert (received.code, received.message, received.details) == (
        "some_code",
        "in words",
        {"key": "v"},
    )


def test_every_expected_error_is_a_computenet_error():
    assert len(EXPECTED) == 6
    assert all(issubclass(e, ComputenetError) for e in EXPECTED)
