"""A simulated agent: realistic finished GPU jobs, POSTed to a gateway.

``python -m services.datacenter_gateway.simulate --gateway-url URL [--token T]
--tenant TENANT=VOUCHER_CODE … [--tenant-without-voucher TENANT …]
[--rate RECORDS_PER_MIN] [--gpu-model M …] [--count N]``

It first hands each tenant's voucher to the gateway, then sends a batch every
few seconds. A batch the gateway did not acknowledge is sent again, the same
records with the same ids, until it is (the gateway absorbs duplicates).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import requests

from services.common.units import SECONDS_PER_HOUR, format_ts, utcnow

log = logging.getLogger("computenet.simulate")

# Most jobs are small; a few take a whole pod.
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GPU_COUNT_WEIGHTS = (30, 20, 18, 16, 7, 4, 2, 1.5, 1, 0.5)
DEFAULT_GPU_MODELS = ("H800", "Ascend-910B")
BATCH_INTERVAL_S = 3.0
MIN_DURATION_S = 300  # 5 minutes
# A job the agent saw start runs at least this long before it is reported.
MIN_SEEN_S = 10
MAX_DURATION_S = 3 * 24 * 3600  # 3 days


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    voucher_code: str | None


def make_job(
    rng: random.Random,
    tenant: Tenant,
    gpu_models: dict[str, int | None],
    late_s: int = 0,
    max_gpus: int = GPU_COUNTS[-1],
    max_duration_s: int = MAX_DURATION_S,
    not_before: datetime | None = None,
) -> dict[str, Any]:
    """One finished job as an agent reports it (voucher left to the gateway).

    A job never starts before ``not_before``, when the agent began watching:
    it reports what it saw, and a voucher pays only for jobs that started
    after its holder authorised the tenant (DESIGN.md §9), which happens
    before the agent starts. A job cut short so ends up to ``MIN_SEEN_S``
    ahead of now at most (the gateway admits 5 minutes).
    """
    model = rng.choice(sorted(gpu_models))
    limit = min(gpu_models[model] or GPU_COUNTS[-1], max_gpus)
    choices = [
        (c, w) for c, w in zip(GPU_COUNTS, GPU_COUNT_WEIGHTS, strict=True) if c <= limit
    ] or [(1, 1)]
    count = rng.choices([c for c, _ in choices], [w for _, w in choices])[0]
    # Log-uniform from 5 minutes to max_duration_s (3 days by default): many
    # short jobs, some long runs.
    span = max(max_duration_s, MIN_DURATION_S) / MIN_DURATION_S
    duration_s = int(round(MIN_DURATION_S * (span ** rng.random())))
    ended = utcnow() - timedelta(seconds=rng.randint(0, 120) + late_s)
    started = ended - timedelta(seconds=duration_s)
    if not_before is not None and started < not_before:
        started = not_before
        ended = max(ended, started + timedelta(seconds=MIN_SEEN_S))
        duration_s = int((ended - started).total_seconds())
    utilisation = rng.uniform(0.35, 0.98)
    return {
        "record_id": f"sim-{uuid.uuid4().hex}",
        "tenant_id": tenant.tenant_id,
        "voucher_code": None,
        "gpu_model": model,
        "gpu_count": count,
        "started_at": format_ts(started),
        "ended_at": format_ts(ended),
        "gpu_seconds": int(count * duration_s * utilisation),
        "source": "simulated",
        "job_id": f"job-{rng.randrange(10**7):07d}",
        "correction_of": None,
    }


def expected_gpu_seconds(
    gpu_models: dict[str, int | None],
    max_gpus: int = GPU_COUNTS[-1],
    max_duration_s: int = MAX_DURATION_S,
    samples: int = 4000,
) -> float:
    """The mean GPU-seconds of one simulated job (estimated, reproducibly)."""
    rng = random.Random(0)
    tenant = Tenant("estimate", None)
    total = sum(
        make_job(rng, tenant, gpu_models, 0, max_gpus, max_duration_s)["gpu_seconds"]
        for _ in range(samples)
    )
    return total / samples


def rate_for_utilisation(
    target: float,
    gpu_models: dict[str, int | None],
    max_gpus: int = GPU_COUNTS[-1],
    max_duration_s: int = MAX_DURATION_S,
) -> float:
    """Jobs per minute that keep ``target`` of the inventory's GPUs busy."""
    counts = [count for count in gpu_models.values() if count]
    if not counts:
        raise ValueError("--utilisation needs the inventory's GPU counts")
    capacity_per_min = sum(counts) * 60
    per_job = expected_gpu_seconds(gpu_models, max_gpus, max_duration_s)
    return target * capacity_per_min / per_job


def day_night_factor(hour_utc: int, utc_offset_h: int = 8) -> float:
    """Load by local hour (default China, UTC+8): busy days, quieter nights.

    A smooth curve from 0.4 at 04:00 to 1.6 at 16:00 local; mean 1.0.
    """
    local = (hour_utc + utc_offset_h) % 24
    return 1.0 + 0.6 * math.cos((local - 16) / 24 * 2 * math.pi)


class GatewayClient:
    def __init__(self, url: str, token: str | None, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def send(
        self, method: str, path: str, body: Any, stop_at: float
    ) -> requests.Response:
        """Send until the gateway answers something other than 'try later'."""
        delay = 0.5
        while True:
            try:
                response = self.session.request(
                    method, self.url + path, json=body, timeout=self.timeout
                )
                if response.status_code not in (502, 503, 504):
                    return response
                wait = float(response.headers.get("Retry-After") or delay)
                reason = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                wait, reason = delay, type(exc).__name__
            if time.monotonic() + wait > stop_at:
                raise TimeoutError(f"{method} {path}: gateway unreachable ({reason})")
            log.warning("%s %s: %s; retrying in %.1f s", method, path, reason, wait)
            time.sleep(wait)
            delay = min(delay * 2, 30.0)


def _tenant(text: str) -> Tenant:
    tenant_id, sep, code = text.partition("=")
    if not sep or not tenant_id or not code:
        raise argparse.ArgumentTypeError("write TENANT=VOUCHER_CODE")
    return Tenant(tenant_id, code)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.datacenter_gateway.simulate"
    )
    parser.add_argument("--gateway-url", required=True)
    parser.add_argument("--token", default=None, help="the gateway's AGENT_TOKEN")
    parser.add_argument("--tenant", type=_tenant, action="append", default=[])
    parser.add_argument("--tenant-without-voucher", action="append", default=[])
    parser.add_argument("--rate", type=float, default=60.0, help="records per minute")
    parser.add_argument(
        "--gpu-model",
        action="append",
        default=[],
        help="default: the gateway's inventory",
    )
    parser.add_argument(
        "--utilisation",
        type=float,
        default=None,
        help="instead of --rate: keep this share of the inventory busy (0..1)",
    )
    parser.add_argument("--max-gpus", type=int, default=GPU_COUNTS[-1])
    parser.add_argument(
        "--max-duration", type=int, default=MAX_DURATION_S, help="seconds"
    )
    parser.add_argument("--count", type=int, default=None, help="stop after N records")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--duplicates",
        type=float,
        default=0.0,
        help="share of records sent again in a later batch (0..1)",
    )
    parser.add_argument(
        "--late",
        type=float,
        default=0.0,
        help="share of records reported late (ended 1-48 h ago)",
    )
    parser.add_argument(
        "--flat", action="store_true", help="no day/night pattern in the rate"
    )
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="first, one short job per tenant, reported once it has run "
        f"{MIN_SEEN_S} s (a fresh network shows every tenant at once)",
    )
    parser.add_argument(
        "--give-up-after",
        type=float,
        default=300.0,
        help="seconds unreachable before exit",
    )
    args = parser.parse_args(argv)
    if not args.tenant and not args.tenant_without_voucher:
        parser.error("name at least one --tenant or --tenant-without-voucher")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.utilisation is not None and not 0 < args.utilisation <= 1:
        parser.error("--utilisation must be in (0, 1]")
    if args.max_gpus < 1 or args.max_duration < MIN_DURATION_S:
        parser.error(f"--max-gpus ≥ 1 and --max-duration ≥ {MIN_DURATION_S}")
    return args


def _post(
    client: GatewayClient,
    batch: list[dict[str, Any]],
    size: int,
    batch_no: int,
    sent: int,
    args: argparse.Namespace,
) -> bool:
    """POST one batch (its first ``size`` records new, the rest sent again);
    False, logged, when the gateway refuses it."""
    response = client.send(
        "POST", "/v1/usage", batch, time.monotonic() + args.give_up_after
    )
    if response.status_code != 202:
        log.error(
            "batch %d refused: %s %s",
            batch_no,
            response.status_code,
            response.text[:500],
        )
        return False
    result = response.json()
    gpu_h = sum(r["gpu_seconds"] for r in batch[:size]) / SECONDS_PER_HOUR
    log.info(
        "batch %d: %d records, accepted=%d dup=%d, %.1f GPU-h, total %d",
        batch_no,
        size,
        result["accepted"],
        result["duplicates"],
        gpu_h,
        sent + size,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s simulate %(levelname)s: %(message)s"
    )
    rng = random.Random(args.seed)
    client = GatewayClient(args.gateway_url, args.token)
    tenants = list(args.tenant) + [Tenant(t, None) for t in args.tenant_without_voucher]
    try:
        for tenant in args.tenant:
            response = client.send(
                "PUT",
                f"/v1/tenants/{tenant.tenant_id}/voucher",
                {"voucher_code": tenant.voucher_code},
                time.monotonic() + args.give_up_after,
            )
            if response.status_code != 200:
                log.error("voucher of %s refused: %s", tenant.tenant_id, response.text)
                return 1
            log.info(
                "tenant %s handed over voucher %s",
                tenant.tenant_id,
                tenant.voucher_code,
            )
        # Records name whole seconds: the next one, so that no job seems to
        # start before an authorisation given within this second.
        watching_since = utcnow().replace(microsecond=0) + timedelta(seconds=1)
        gpu_models: dict[str, int | None] = {m: None for m in args.gpu_model}
        if not gpu_models:
            status = client.send(
                "GET", "/v1/status", None, time.monotonic() + args.give_up_after
            ).json()
            gpu_models = {
                i["gpu_model"]: i["count"] for i in status.get("inventory") or []
            }
            gpu_models = gpu_models or {m: None for m in DEFAULT_GPU_MODELS}
        rate = args.rate
        if args.utilisation is not None:
            rate = rate_for_utilisation(
                args.utilisation, gpu_models, args.max_gpus, args.max_duration
            )
            log.info(
                "%.1f jobs/min keep %.0f %% of %d GPUs busy",
                rate,
                args.utilisation * 100,
                sum(c for c in gpu_models.values() if c),
            )
        sent = batch_no = 0
        if args.warm_start:
            # At night the rate is a job every half minute or so: without
            # this a fresh `make run` could show no subsidy for a minute.
            time.sleep(
                max(0.0, (watching_since - utcnow()).total_seconds() + MIN_SEEN_S)
            )
            first = [
                make_job(
                    rng,
                    tenant,
                    gpu_models,
                    max_gpus=args.max_gpus,
                    max_duration_s=MIN_DURATION_S,
                    not_before=watching_since,
                )
                for tenant in tenants[: args.count]
            ]
            batch_no += 1
            if not _post(client, first, len(first), batch_no, sent, args):
                return 1
            sent += len(first)
        per_batch = rate * BATCH_INTERVAL_S / 60.0
        carry = 0.0
        resend: list[dict[str, Any]] = []
        while args.count is None or sent < args.count:
            factor = 1.0 if args.flat else day_night_factor(utcnow().hour)
            carry += per_batch * factor
            size = int(carry)
            carry -= size
            if args.count is not None:
                size = min(size, args.count - sent)
            if size > 0:
                batch = [
                    make_job(
                        rng,
                        rng.choice(tenants),
                        gpu_models,
                        late_s=rng.randint(3600, 48 * 3600)
                        if rng.random() < args.late
                        else 0,
                        max_gpus=args.max_gpus,
                        max_duration_s=args.max_duration,
                        not_before=watching_since,
                    )
                    for _ in range(size)
                ]
                # Duplicates on request: some records of earlier batches again,
                # as an agent retrying after a lost reply would send them.
                again, resend = (
                    resend,
                    [r for r in batch if rng.random() < args.duplicates],
                )
                batch = batch + again
                batch_no += 1
                if not _post(client, batch, size, batch_no, sent, args):
                    return 1
                sent += size
                if args.count is not None and sent >= args.count:
                    break
            time.sleep(BATCH_INTERVAL_S)
    except TimeoutError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
