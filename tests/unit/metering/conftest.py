"""Fixtures for metering's unit tests: a migrated SQLite database."""

import pytest
from sqlalchemy.orm import sessionmaker

from services.common.db import make_engine
from services.common.migrations import upgrade


@pytest.fixture
def session(sqlite_url):
    """A session on a fresh SQLite database at metering's latest migration."""
    upgrade("metering", sqlite_url)
    engine = make_engine(sqlite_url)
    with sessionmaker(engine, expire_on_commit=False)() as session:
        yield session
    engine.dispose()
