"""Retention wired into the processes: the floor stops a service at setup,
the timer reads its interval from the config, the gateway's and the portal's
pruners prune their own tables (SQLite)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from nameko import config
from sqlalchemy import func, insert, select

from gateway.audit import AuditLog, audit_log
from gateway.audit_retention import AuditPruner
from services.common.config import DATABASE_URL, RETENTION, ConfigError
from services.common.db import make_engine
from services.common.migrations import upgrade
from services.common.retention import policy_from_config
from services.common.retention_entrypoints import Retention, RetentionTimer
from services.common.units import utcnow
from services.datacenter_gateway.outbox import OutboxRecord
from services.datacenter_gateway.retention import OutboxPruner
from services.metering.retention import targets as metering_targets


def test_a_retention_below_its_floor_stops_the_service_at_setup(sqlite_url):
    settings = {DATABASE_URL: sqlite_url, RETENTION: {"processed_events_days": 3}}
    with config.patch(settings, clear=True):
        with pytest.raises(ConfigError, match="processed_events_days is 3"):
            Retention(metering_targets).setup()


def test_the_timer_interval_comes_from_the_config():
    timer = RetentionTimer()
    with config.patch({RETENTION: {"interval_s": 42}}, clear=True):
        timer.setup()
    assert timer.interval == 42


def test_the_gateway_prunes_published_ended_records(sqlite_url):
    upgrade("datacenter_gateway", sqlite_url)
    engine = make_engine(sqlite_url)
    old = utcnow() - timedelta(days=30)
    with engine.begin() as connection:
        connection.execute(
            insert(OutboxRecord),
            [
                {
                    "record_id": name,
                    "body": b"{}",
                    "agent_digest": "0" * 64,
                    "tenant_id": "t",
                    "gpu_model": "H800",
                    "gpu_count": 1,
                    "started_at": old - timedelta(hours=1),
                    "ended_at": old,
                    "created_at": old,
                    "published_at": published,
                }
                for name, published in (("sent", old), ("unsent", None))
            ],
        )
    assert OutboxPruner(engine, policy_from_config({})).prune_once() == 1
    with engine.connect() as connection:
        left = connection.execute(select(OutboxRecord.record_id)).scalars().all()
    assert left == ["unsent"]
    engine.dispose()


def test_the_portal_prunes_its_audit_log_once_an_interval(sqlite_url):
    audit = AuditLog(sqlite_url)
    entry = {
        "actor": "national_admin",
        "action": "x",
        "method": "POST",
        "path": "/x",
        "status": 200,
        "details": {},
    }
    with audit.engine.begin() as connection:
        connection.execute(
            insert(audit_log),
            [
                {**entry, "at": utcnow() - timedelta(days=500)},
                {**entry, "at": utcnow() - timedelta(days=200)},
            ],
        )
    now = [0.0]
    pruner = AuditPruner(audit, policy_from_config({}), clock=lambda: now[0])
    assert not pruner.maybe_start()  # not before one interval
    now[0] = 301.0
    assert pruner.maybe_start()
    pruner.join(10)
    assert not pruner.maybe_start()  # and not again within the next
    with audit.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(audit_log)) == 1
    audit.dispose()
