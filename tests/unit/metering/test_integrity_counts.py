"""metering's integrity counts: records rated (in the hour they started) and
dead letters by reason, per data centre, over 24 h and 7 days."""

from datetime import timedelta

from services.common.units import utcnow
from services.metering.integrity import integrity_counts
from services.metering.models import DeadLetter, UsageRollup

NOW = utcnow().replace(minute=30, second=0, microsecond=0)


def rollup(dc: str, hours_ago: int, records: int) -> UsageRollup:
    return UsageRollup(
        datacenter_id=dc,
        city="shanghai",
        tenant_id="t",
        voucher_code="",
        gpu_model="H800",
        hour=(NOW - timedelta(hours=hours_ago)).replace(minute=0),
        records=records,
        gpu_seconds=3600 * records,
        cost_fen=100 * records,
    )


def letter(dc: str, reason: str, hours_ago: int) -> DeadLetter:
    return DeadLetter(
        received_at=NOW - timedelta(hours=hours_ago),
        routing_key=f"{dc}.usage",
        datacenter_id=dc,
        record_id=None,
        reason=reason,
        detail="",
        headers={},
        body="{}",
    )


def test_counts_per_window_and_reason(session):
    session.add_all(
        [
            rollup("dc-a", 1, 10),
            rollup("dc-a", 48, 5),  # in 7 d, not in 24 h
            rollup("dc-a", 24 * 8, 99),  # in neither
            rollup("dc-b", 2, 3),
            letter("dc-a", "exceeds_inventory", 1),
            letter("dc-a", "exceeds_inventory", 30),
            letter("dc-a", "schema", 2),
            letter("dc-c", "bad_signature", 3),  # letters but nothing rated
        ]
    )
    session.commit()

    counts = integrity_counts(session, now=NOW)

    assert counts["dc-a"]["24h"] == {
        "records": 10,
        "dead_letters": {"exceeds_inventory": 1, "schema": 1},
    }
    assert counts["dc-a"]["7d"] == {
        "records": 15,
        "dead_letters": {"exceeds_inventory": 2, "schema": 1},
    }
    assert counts["dc-b"]["7d"] == {"records": 3, "dead_letters": {}}
    assert counts["dc-c"]["24h"] == {"records": 0, "dead_letters": {"bad_signature": 1}}


def test_nothing_yet_is_empty(session):
    assert integrity_counts(session, now=NOW) == {}
