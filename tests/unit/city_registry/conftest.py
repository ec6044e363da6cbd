"""The registry caches its national views per process: each test starts empty."""

import pytest

from services.city_registry.service import VIEWS


@pytest.fixture(autouse=True)
def _fresh_view_cache():
    VIEWS.clear()
    yield
    VIEWS.clear()
