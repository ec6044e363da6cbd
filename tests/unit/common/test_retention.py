"""The pruner and the retention policy (services/common/retention.py), on SQLite."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
)

from services.common.config import RETENTION, ConfigError
from services.common.db import make_engine
from services.common.retention import (
    CLASSES,
    Target,
    policy_from_config,
    prune,
    prune_targets,
)
from services.common.sqltypes import UtcDateTime
from services.common.units import utcnow

metadata = MetaData()
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", UtcDateTime, nullable=False),
    Column("published_at", UtcDateTime, nullable=True),
)
# A composite key, as processed_events and the capacity tables have.
claims = Table(
    "claims",
    metadata,
    Column("owner", String(16), primary_key=True),
    Column("key", String(16), primary_key=True),
    Column("at", UtcDateTime, nullable=False),
)


@pytest.fixture
def engine(sqlite_url):
    engine = make_engine(sqlite_url)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def _count(engine, table) -> int:
    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(table))


def test_prune_deletes_only_old_rows_in_batches(engine):
    now = utcnow()
    old, young = now - timedelta(days=10), now - timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            insert(events),
            [{"at": old if n < 2500 else young} for n in range(3000)],
        )
    pauses = []
    pruned = prune(
        engine,
        events,
        events.c.at < now - timedelta(days=1),
        batch_size=1000,
        pause_s=0.01,
        sleep=pauses.append,
    )
    assert pruned.rows == 2500
    assert pruned.batches == 3  # 1000, 1000, 500: the short one ends it
    assert pauses == [0.01, 0.01]
    assert 0 < pruned.longest_batch_s <= pruned.seconds
    assert _count(engine, events) == 500
    with engine.connect() as connection:
        assert connection.scalar(select(func.min(events.c.at))) >= young - timedelta(
            seconds=1
        )


def test_prune_stops_after_max_batches(engine):
    with engine.begin() as connection:
        connection.execute(insert(events), [{"at": utcnow()} for _ in range(50)])
    pruned = prune(
        engine, events, events.c.at <= utcnow(), batch_size=10, max_batches=2
    )
    assert (pruned.rows, pruned.batches) == (20, 2)
    assert _count(engine, events) == 30


def test_prune_by_a_composite_key(engine):
    now = utcnow()
    with engine.begin() as connection:
        connection.execute(
            insert(claims),
            [
                {"owner": f"o{n % 3}", "key": str(n), "at": now - timedelta(days=n)}
                for n in range(30)
            ],
        )
    pruned = prune(
        engine, claims, claims.c.at < now - timedelta(days=9, hours=12), batch_size=7
    )
    assert pruned.rows == 20
    assert _count(engine, claims) == 10


def test_prune_with_nothing_to_delete_is_one_empty_batch(engine):
    pruned = prune(engine, events, events.c.at < utcnow())
    assert (pruned.rows, pruned.batches) == (0, 1)


def test_unpublished_rows_are_kept_whatever_their_age(engine):
    """The services' outbox condition: old *and* published."""
    now = utcnow()
    ancient = now - timedelta(days=1000)
    with engine.begin() as connection:
        connection.execute(
            insert(events),
            [
                {"at": ancient, "published_at": ancient},
                {"at": ancient, "published_at": None},
                {"at": now, "published_at": now},
            ],
        )
    policy = policy_from_config({})
    target = Target(
        events,
        "outbox",
        lambda cutoff: (
            events.c.published_at.is_not(None) & (events.c.published_at < cutoff)
        ),
    )
    [pruned] = prune_targets(engine, [target], policy, now=now)
    assert pruned.rows == 1
    with engine.connect() as connection:
        kept = connection.execute(select(events.c.published_at)).scalars().all()
    assert sorted(kept, key=lambda v: v is not None) == [None, now]


def test_a_disabled_policy_prunes_nothing(engine):
    with engine.begin() as connection:
        connection.execute(insert(events), [{"at": utcnow() - timedelta(days=999)}])
    policy = policy_from_config({RETENTION: {"enabled": False}})
    target = Target(events, "outbox", lambda cutoff: events.c.at < cutoff)
    assert prune_targets(engine, [target], policy) == []
    assert _count(engine, events) == 1


def test_a_failing_table_does_not_stop_the_others(engine, caplog):
    missing = Table("missing", MetaData(), Column("id", Integer, primary_key=True))
    with engine.begin() as connection:
        connection.execute(insert(events), [{"at": utcnow() - timedelta(days=999)}])
    targets = [
        Target(missing, "outbox", lambda cutoff: missing.c.id > 0),
        Target(events, "outbox", lambda cutoff: events.c.at < cutoff),
    ]
    [pruned] = prune_targets(engine, targets, policy_from_config({}))
    assert pruned.rows == 1
    assert "pruning missing failed" in caplog.text


# -- the policy ----------------------------------------------------------------


def test_defaults_are_at_or_above_their_floors():
    policy = policy_from_config({})
    for name, retention in CLASSES.items():
        assert policy.days[name] == retention.default_days >= retention.floor_days


def test_processed_events_outlive_every_replayable_copy():
    """A duplicate can come from the outbox's relay or a parked copy's replay."""
    days = policy_from_config({}).days
    assert days["processed_events"] >= days["outbox"]
    assert days["processed_events"] >= days["dead_letters"]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_value_below_the_floor_is_refused(name):
    floor = CLASSES[name].floor_days
    with pytest.raises(ConfigError, match=f"below its floor of {floor} days"):
        policy_from_config({RETENTION: {f"{name}_days": floor - 1}})
    assert policy_from_config({RETENTION: {f"{name}_days": floor}}).days[name] == floor


@pytest.mark.parametrize(
    "settings",
    [
        {"outbox_days": "7"},
        {"outbox_days": 7.5},
        {"outbox_days": True},
        {"outboxx_days": 7},
        {"batch_size": 0},
        {"batch_size": 1.5},
        {"interval_s": 0},
        {"pause_s": -1},
        {"enabled": "yes"},
    ],
)
def test_malformed_settings_are_refused(settings):
    with pytest.raises(ConfigError, match=RETENTION):
        policy_from_config({RETENTION: settings})


def test_settings_are_read():
    policy = policy_from_config(
        {
            RETENTION: {
                "outbox_days": 3,
                "interval_s": 60,
                "batch_size": 500,
                "pause_s": 0,
                "max_batches": 5,
            }
        }
    )
    assert policy.days["outbox"] == 3
    assert (policy.interval_s, policy.batch_size, policy.pause_s) == (60, 500, 0)
    assert policy.max_batches == 5
    now = utcnow()
    assert policy.cutoff("outbox", now) == now - timedelta(days=3)
