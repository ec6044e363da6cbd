"""Replaying a dead letter once its cause is fixed (a data centre registered
late), and the portal's reads over the rollups (SQLite, fake registry)."""

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from services.common.errors import NotFound
from services.common.units import format_ts, utcnow
from services.metering import ingest, reports
from services.metering.models import DeadLetter, UsageRecord
from services.metering.registry import CachedRegistry, RegistryCacheState
from services.metering.testing import (
    DATACENTER,
    DATACENTER_ID,
    KEY_ID,
    PREFIXES,
    SECRET,
    capacity,
    raw_message,
    usage,
    voucher,
)


class LateRegistry:
    def __init__(self):
        self.registered = False

    def get_datacenter(self, datacenter_id):
        if not self.registered or datacenter_id != DATACENTER_ID:
            raise NotFound("datacenter_not_found")
        return DATACENTER

    def datacenter_signing_keys(self, datacenter_id):
        return [{"key_id": KEY_ID, "secret": SECRET}]

    def voucher_prefixes(self):
        return PREFIXES


def test_dead_letter_replayed_after_late_registration_is_applied_once(session):
    fake = LateRegistry()
    registry = CachedRegistry(RegistryCacheState(ttl_s=30), fake)
    record = usage(voucher_code=voucher("SH"))
    outcome = ingest.process_batch(session, registry, [raw_message(record)])
    assert [refused.reason for _, refused in outcome.refused] == ["unknown_datacenter"]
    [letter] = reports.list_dead_letters(session)

    result, _ = reports.replay_dead_letter(session, registry, letter["id"])
    assert result == {"outcome": "dead_letter", "reason": "unknown_datacenter"}

    fake.registered = True
    result, outgoing = reports.replay_dead_letter(session, registry, letter["id"])
    assert result == {"outcome": "applied", "reason": None}
    assert [event.payload["record_id"] for event in outgoing] == [record["record_id"]]
    again, _ = reports.replay_dead_letter(session, registry, letter["id"])
    assert again["outcome"] == "applied"  # the same body again: nothing changes
    assert session.scalar(select(func.count()).select_from(UsageRecord)) == 1
    assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1
    [listed] = reports.list_dead_letters(session)
    assert listed["replay_outcome"] == "applied"
    with pytest.raises(NotFound):
        reports.replay_dead_letter(session, registry, 999)


def test_usage_by_tenant_hour_and_figures_per_region(session):
    fake = LateRegistry()
    fake.registered = True
    registry = CachedRegistry(RegistryCacheState(ttl_s=30), fake)
    now = utcnow().replace(microsecond=0, second=0, minute=0)
    start = now - timedelta(hours=3)
    records = [
        usage(
            tenant_id="a",
            gpu_count=1,
            gpu_seconds=3 * 3600,
            started_at=format_ts(start),
            ended_at=format_ts(now),
        ),
        usage(
            tenant_id="b",
            gpu_count=1,
            gpu_seconds=600,
            started_at=format_ts(now - timedelta(minutes=20)),
            ended_at=format_ts(now - timedelta(minutes=10)),
        ),
    ]
    messages = [raw_message(r) for r in records]
    messages.append(
        raw_message(
            capacity(now - timedelta(minutes=4), total=10, allocated=3),
            routing_key=f"{DATACENTER_ID}.capacity",
        )
    )
    assert not ingest.process_batch(session, registry, messages).refused

    by_tenant = reports.usage_by_tenant(session, DATACENTER_ID, 24, now=now)
    assert [(r["tenant_id"], r["gpu_seconds"]) for r in by_tenant] == [
        ("a", 3 * 3600),
        ("b", 600),
    ]
    by_hour = reports.usage_by_hour(session, DATACENTER_ID, 24, now=now)
    assert [r["gpu_seconds"] for r in by_hour] == [3600, 3600, 3600 + 600]
    # The whole network (this one data centre), and a filter that filters.
    assert reports.usage_by_hour(session, None, 24, now=now) == by_hour
    assert reports.usage_by_hour(session, "elsewhere-01", 24, now=now) == []
    figures = reports.usage_figures(session, now=now)
    assert figures["datacenters"][DATACENTER_ID]["hub_region"] == "west"
    west = figures["regions"]["west"]
    assert west["datacenters"] == 1
    assert west["24h"]["gpu_seconds"] == 3 * 3600 + 600
    # Reports began 4 minutes before the hour: the first stands from the start
    # of its hour, and utilisation counts usage from that hour on.
    assert west["24h"]["capacity_gpu_seconds"] == 10 * 3600
    assert west["24h"]["utilisation"] == pytest.approx((3600 + 600) / (10 * 3600))
