"""Pure rules of the gateway: signing headers, capacity reports, back-off."""

import json
from datetime import timedelta

from services.common import signing
from services.common.backoff import Backoff
from services.common.contracts import CapacityReportSchema
from services.common.units import format_ts, utcnow
from services.datacenter_gateway import domain


def test_message_headers_sign_the_exact_body():
    body = b'{"record_id":"r1"}'
    headers = domain.message_headers(body, "k1", "secret")
    assert headers["x-key-id"] == "k1"
    assert signing.verify(body, "secret", headers["x-signature"])
    assert not signing.verify(body + b" ", "secret", headers["x-signature"])


def test_capacity_report_caps_allocation_at_total():
    inventory = [domain.InventoryItem("H800", 8), domain.InventoryItem("A800", 4)]
    body = domain.capacity_report("dc-1", inventory, {"H800": 20, "X": 3}, utcnow())
    report = json.loads(body)
    CapacityReportSchema().load(report)
    assert report["gpus"] == [
        {"model": "H800", "total": 8, "allocated": 8},
        {"model": "A800", "total": 4, "allocated": 0},
    ]


def test_backoff_doubles_to_a_cap_and_resets():
    backoff = Backoff(jitter=False)
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_backoff_jitter_spreads_each_step_over_its_upper_half():
    """1 000 gateways that lost the broker together do not come back together."""
    import random
    import statistics

    steps = [0.5, 1, 2, 4, 8, 16, 30, 30]
    gateways = [Backoff(rng=random.Random(seed)) for seed in range(1000)]
    for step in steps:
        delays = [g.next_delay() for g in gateways]
        assert all(step / 2 <= d <= step for d in delays)
        # spread over the interval, not bunched: a uniform's deviation is w/√12
        assert statistics.pstdev(delays) > 0.8 * (step / 2) / 12**0.5
        assert len(set(delays)) > 990


def test_parse_inventory_finds_this_datacenter():
    data = {
        "datacenters": [{"id": "a", "inventory": [{"gpu_model": "H800", "count": 2}]}]
    }
    assert domain.parse_inventory(data, "a") == [domain.InventoryItem("H800", 2)]
    assert domain.parse_inventory(data, "b") == []


def test_allocated_gpus_counts_records_running_now(outbox, record_factory, client):
    now = utcnow()
    running = record_factory(
        gpu_count=4,
        gpu_seconds=0,
        started_at=format_ts(now - timedelta(hours=1)),
        ended_at=format_ts(now + timedelta(minutes=4)),
    )
    client.post("/v1/usage", json=[running, record_factory()])
    assert outbox.allocated_gpus(now) == {"H800": 4}
