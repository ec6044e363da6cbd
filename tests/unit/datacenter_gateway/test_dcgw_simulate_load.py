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


def test_a_warm_start_reports_one_short_job_per_tenant_first(monkeypatch):
    """``make run`` moves from the first minute, even at night when the rate
    is a job every half minute: the first batch holds one job per tenant,
    each seen to start after the agent began watching and reported only once
    it has ended."""
    from datetime import timedelta

    import requests

    from services.common.units import utcnow

    clock = [utcnow()]
    monkeypatch.setattr(simulate, "utcnow", lambda: clock[0])
    monkeypatch.setattr(
        simulate.time,
        "sleep",
        lambda s: clock.__setitem__(0, clock[0] + timedelta(seconds=s)),
    )
    posted: list[tuple[object, list[dict]]] = []

    def send(self, method, path, body, stop_at):
        response = requests.Response()
        if method == "POST":
            posted.append((clock[0], body))
            response.status_code = 202
            response._content = b'{"accepted": %d, "duplicates": 0}' % len(body)
        else:
            response.status_code = 200
            response._content = b"{}"
        return response

    monkeypatch.setattr(simulate.GatewayClient, "send", send)
    started_at = clock[0]
    argv = ["--gateway-url", "http://gw", "--gpu-model", "H800", "--seed", "4"]
    argv += ["--tenant", "a=SH-1", "--tenant", "b=SH-2"]
    argv += ["--tenant-without-voucher", "c", "--rate", "1", "--count", "4"]
    assert simulate.main([*argv, "--warm-start"]) == 0

    (first_at, first), *rest = posted
    assert sorted(r["tenant_id"] for r in first) == ["a", "b", "c"]
    for record in first:
        started, ended = parse_ts(record["started_at"]), parse_ts(record["ended_at"])
        assert started > started_at
        assert ended - started >= timedelta(seconds=simulate.MIN_SEEN_S)
        assert ended <= first_at
    assert first_at - started_at < timedelta(seconds=simulate.MIN_SEEN_S + 2)
    assert sum(len(batch) for _, batch in rest) == 1  # --count counts them
    # Without it, the first record comes at the rate's pace.
    posted.clear()
    clock[0] = started_at = utcnow()
    assert simulate.main([*argv, "--count", "1"]) == 0
    assert posted[0][0] - started_at > timedelta(seconds=30)
