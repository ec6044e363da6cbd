"""Fixtures of metering's unit tests (the data is tests/support/metering_data.py)."""

import pytest
from sqlalchemy.orm import sessionmaker

from services.common.db import make_engine
from services.common.migrations import upgrade


@pytest.fixture
def session(sqlite_url):
    """A session on a migrated metering database in SQLite."""
    upgrade("metering", sqlite_url)
    engine = make_engine(sqlite_url)
    with sessionmaker(engine, expire_on_commit=False)() as session:
        yield session
    engine.dispose()
