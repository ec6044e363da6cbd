"""The simulated agent can be asked for a utilisation instead of a rate: the
jobs it then sends keep that share of the inventory busy, on average."""

import random

import pytest

from services.common.units import parse_ts
from services.datacenter_gateway import simulate

INVENTORY = {"H800": 256, "Ascend-910B": 512}


def test_default_jobs_span_one_to_512_gpus_and_minutes_to_days():
    rng = random.Random(1)
    tenant = simulate.Tenant("t", None)
    jobs = [simulate.make_job(rng, tenant, {"H800": None}) for _ in range(3000)]
    counts = {job["gpu_count"] for job in jobs}
    assert min(counts) == 1 and max(counts) == 512
    spans = [parse_ts(job["ended_at"]) - parse_ts(job["started_at"]) for job in jobs]
    assert min(spans).total_seconds() < 600
    assert max(spans).total_seconds() > 24 * 3600


def test_limits_bound_every_job():
    rng = random.Random(2)
    tenant = simulate.Tenant("t", None)
    for _ in range(2000):
        job = simulate.make_job(rng, tenant, INVENTORY, max_gpus=8, max_duration_s=3600)
        span = parse_ts(job["ended_at"]) - parse_ts(job["started_at"])
        assert 1 <= job["gpu_count"] <= 8
        assert span.total_seconds() <= 3600
        assert job["gpu_seconds"] <= job["gpu_count"] * span.total_seconds()


@pytest.mark.parametrize("target", [0.1, 0.3, 0.8])
def test_a_utilisation_target_sets_the_rate(target):
    rate = simulate.rate_for_utilisation(target, INVENTORY, 8, 3600)
    # Independently: simulate an hour of arrivals at that rate.
    rng = random.Random(3)
    tenant = simulate.Tenant("t", None)
    jobs = int(rate * 600)  # ten hours of jobs
    used = sum(
        simulate.make_job(rng, tenant, INVENTORY, 0, 8, 3600)["gpu_seconds"]
        for _ in range(jobs)
    )
    capacity = sum(INVENTORY.values()) * 600 * 60
    assert used / capacity == pytest.approx(target, rel=0.1)


def test_a_utilisation_target_needs_counts():
    with pytest.raises(ValueError, match="GPU counts"):
        simulate.rate_for_utilisation(0.3, {"H800": None})


def test_no_job_starts_before_the_agent_began_watching():
    """The demo's vouchers pay only for jobs that started after their tenants
    were authorised, just before the agents start (DESIGN.md §9)."""
    from datetime import timedelta

    from services.common.units import utcnow

    rng = random.Random(3)
    tenant = simulate.Tenant("t", None)
    since = utcnow().replace(microsecond=0) - timedelta(seconds=30)
    for _ in range(500):
        job = simulate.make_job(rng, tenant, INVENTORY, late_s=0, not_before=since)
        started, ended = parse_ts(job["started_at"]), parse_ts(job["ended_at"])
        assert started >= since
        assert ended - started >= timedelta(seconds=simulate.MIN_SEEN_S)
        assert ended <= utcnow() + timedelta(seconds=simulate.MIN_SEEN_S)
        assert (
            job["gpu_seconds"] <= job["gpu_count"] * (ended - started).total_seconds()
        )
