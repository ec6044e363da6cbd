"""The data-centre gateway's unit tests: ``client`` is its agent API's test
client (the outbox, settings and records come from ``tests/support/agent_api.py``,
shared with the security ring)."""

import pytest


@pytest.fixture
def client(make_client):
    return make_client()
