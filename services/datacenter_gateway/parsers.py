"""Agent formats → usage records (CONTRACTS.md §1 fields, less ``datacenter_id``).

Pure Python: text in, records out. Three formats a data centre already has:

- ``parse_sacct``: Slurm accounting, ``sacct --parsable2`` with a header line
  (or ``--parsable``/``--noheader`` with the columns and delimiter given);
- ``parse_accounted_apps``: ``nvidia-smi --query-accounted-apps=… --format=csv``;
- ``parse_gpu_samples``: ``nvidia-smi --query-gpu=… --format=csv`` samples taken
  every ``interval_s`` by a sampler, turned into usage by a GPU → tenant map.

Nothing is guessed: a line a parser cannot read is an error naming the line
(1-based, as in the body); a job that is not finished is skipped and reported.
The caller stores nothing when there is any error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from services.common.units import format_ts


@dataclass
class ParseResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # {line, error}
    skipped: list[dict[str, Any]] = field(
        default_factory=list
    )  # {line, job_id, reason}
    ignored: dict[str, int] = field(default_factory=dict)  # counts, e.g. job steps
    lines: list[int] = field(default_factory=list)  # the line of each record

    def add(self, line: int, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.lines.append(line)

    def error(self, line: int, message: str) -> None:
        self.errors.append({"line": line, "error": message})

    def ignore(self, what: str) -> None:
        self.ignored[what] = self.ignored.get(what, 0) + 1

    @property
    def gpu_seconds(self) -> int:
        return sum(r["gpu_seconds"] for r in self.records)

    def summary(self) -> dict[str, Any]:
        return {
            "records": len(self.records),
            "gpu_seconds": self.gpu_seconds,
            "skipped": self.skipped,
            "ignored": self.ignored,
        }


class GpuModels:
    """Names the tools print (``a100``, ``NVIDIA H200``) → this data centre's models.

    An explicit ``mapping`` wins; then a model of the ``inventory`` equal to the
    name ignoring case and a leading ``NVIDIA ``; with no inventory known, the
    name as printed (metering judges it). Otherwise ``None``: not guessed.
    """

    def __init__(
        self,
        mapping: Mapping[str, str] | None = None,
        inventory: Iterable[str] = (),
        default: str | None = None,
    ):
        self.mapping = {k.lower(): v for k, v in (mapping or {}).items()}
        self.inventory = list(inventory)
        self.default = default

    def resolve(self, name: str | None) -> str | None:
        if not name:
            return self.default
        key = name.strip().lower()
        if key in self.mapping:
            return self.mapping[key]
        bare = key.removeprefix("nvidia ").strip()
        for model in self.inventory:
            if model.lower() in (key, bare):
                return model
        return None if self.inventory else name.strip()


# -- Slurm -------------------------------------------------------------------

# JobID as sacct prints it: 123, 123_7 (array task), 123_[1-5%2] (pending array),
# 123+1 (heterogeneous component), then .batch / .extern / .0 for steps.
_JOB_ID = re.compile(
    r"^(?P<job>\d+(?:_(?:\d+|\[[^\]]*\]))?(?:\+\d+)?)(?:\.(?P<step>.+))?$"
)
# States in which the allocation still holds (or may again hold) its GPUs.
UNFINISHED_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "CONFIGURING",
    "COMPLETING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}
_NO_TIME = {"", "None", "Unknown"}
REQUIRED_SACCT_COLUMNS = ("JobID", "Start", "End", "AllocTRES")


def parse_sacct(
    text: str,
    *,
    tz: tzinfo = UTC,
    delimiter: str = "|",
    columns: list[str] | None = None,
    tenant_field: str = "Account",
    tenants: Mapping[str, str] | None = None,
    gpu_models: GpuModels | None = None,
) -> ParseResult:
    """sacct output → one record per finished job allocation with GPUs.

    GPUs come from ``AllocTRES`` (``gres/gpu:<type>=N`` per type when typed,
    else ``gres/gpu=N``), time from ``Start``/``End`` (local time in ``tz``).
    Steps (``123.batch``, ``123.0``) are inside their allocation's GPUs and are
    not counted again; each array task (``123_7``) and heterogeneous component
    (``123+1``) is its own allocation. ``record_id`` is ``slurm-<JobID>``
    (``-<type>`` when one job holds several GPU types, ``<Cluster>-`` when that
    column is present), so posting the same output again changes nothing.
    """
    result = ParseResult()
    gpu_models = gpu_models or GpuModels()
    tenants = tenants or {}
    header: list[str] | None = list(columns) if columns else None
    if header is not None and not _check_sacct_header(header, tenant_field, 0, result):
        return result
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        values = line.split(delimiter)
        if header is None:
            header = [v.strip() for v in values]
            if not _check_sacct_header(header, tenant_field, number, result):
                return result
            continue
        # --parsable (not --parsable2) ends every line with the delimiter.
        if len(values) == len(header) + 1 and values[-1] == "":
            values.pop()
        if len(values) != len(header):
            result.error(number, f"expected {len(header)} fields, found {len(values)}")
            continue
        _sacct_row(
            dict(zip(header, values, strict=True)),
            number,
            result,
            tz,
            tenant_field,
            tenants,
            gpu_models,
        )
    if header is None:
        result.error(1, "empty input: no header line naming the columns")
    return result


def _check_sacct_header(
    header: list[str], tenant_field: str, number: int, result: ParseResult
) -> bool:
    missing = [c for c in (*REQUIRED_SACCT_COLUMNS, tenant_field) if c not in header]
    if missing:
        result.error(
            number,
            "header lacks column(s) "
            + ", ".join(missing)
            + " (sacct --parsable2 --format=JobID,Account,State,Start,End,AllocTRES)",
        )
        return False
    return True


def _sacct_row(
    row: dict[str, str],
    number: int,
    result: ParseResult,
    tz: tzinfo,
    tenant_field: str,
    tenants: Mapping[str, str],
    gpu_models: GpuModels,
) -> None:
    job_id = row["JobID"].strip()
    match = _JOB_ID.match(job_id)
    if not match:
        result.error(number, f"JobID {job_id!r} is not a Slurm job id")
        return
    if match.group("step"):
        result.ignore("job_steps")  # counted in its allocation's line
        return
    state = (row.get("State") or "").strip()
    state_word = state.split(" ")[0].rstrip("+")
    if state_word in UNFINISHED_STATES or row["End"].strip() in _NO_TIME:
        result.skipped.append(
            {
                "line": number,
                "job_id": job_id,
                "reason": "unfinished",
                "state": state or None,
            }
        )
        return
    try:
        gpus = parse_alloc_tres(row["AllocTRES"])
    except ValueError as exc:
        result.error(number, str(exc))
        return
    if not gpus:
        result.ignore("jobs_without_gpus")
        return
    if row["Start"].strip() in _NO_TIME:
        # Ended before it started (cancelled while pending): no GPU time.
        result.ignore("jobs_never_started")
        return
    try:
        started = _local_time(row["Start"], tz)
        ended = _local_time(row["End"], tz)
    except ValueError as exc:
        result.error(number, str(exc))
        return
    elapsed = int((ended - started).total_seconds())
    if elapsed < 0:
        result.error(number, f"End {row['End']} is before Start {row['Start']}")
        return
    if elapsed == 0:
        result.ignore("jobs_of_zero_length")
        return
    account = (row.get(tenant_field) or "").strip()
    if not account:
        result.error(number, f"{tenant_field} is empty: no tenant to bill")
        return
    tenant = tenants.get(account, account)
    cluster = (row.get("Cluster") or "").strip()
    base_id = f"slurm-{cluster + '-' if cluster else ''}{job_id}"
    for gpu_type, count in gpus.items():
        model = gpu_models.resolve(gpu_type)
        if model is None:
            result.error(
                number,
                f"GPU type {gpu_type or '(untyped gres/gpu)'!r} maps to no GPU "
                "model of this data centre (configure SLURM_GPU_MODELS or "
                "?gpu_model=)",
            )
            return
        result.add(
            number,
            {
                "record_id": base_id + (f"-{gpu_type}" if len(gpus) > 1 else ""),
                "tenant_id": tenant,
                "voucher_code": None,
                "gpu_model": model,
                "gpu_count": count,
                "started_at": format_ts(started),
                "ended_at": format_ts(ended),
                "gpu_seconds": count * elapsed,
                "source": "slurm",
                "job_id": job_id,
                "correction_of": None,
            },
        )


def parse_alloc_tres(text: str) -> dict[str | None, int]:
    """``billing=8,cpu=8,gres/gpu:a100=2,gres/gpu=2`` → ``{"a100": 2}``.

    Typed counts when any are present (``gres/gpu`` is then their sum), else
    ``{None: N}`` from ``gres/gpu=N``; ``{}`` for a job without GPUs. Other
    ``gres/gpu…`` TRES (``gres/gpumem``, ``gres/gpuutil``) are not GPUs.
    """
    typed: dict[str | None, int] = {}
    total: int | None = None
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"AllocTRES item {item!r} is not name=value")
        if name == "gres/gpu" or name.startswith("gres/gpu:"):
            try:
                count = int(value)
            except ValueError:
                raise ValueError(f"AllocTRES {name}={value!r}: not a count") from None
            if name == "gres/gpu":
                total = count
            else:
                typed[name.split(":", 1)[1]] = count
    typed = {k: v for k, v in typed.items() if v > 0}
    if typed:
        return typed
    return {None: total} if total else {}


def _local_time(text: str, tz: tzinfo) -> datetime:
    try:
        naive = datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise ValueError(f"time {text!r} is not YYYY-MM-DDTHH:MM:SS") from None
    return naive.replace(tzinfo=tz).astimezone(UTC)


# -- nvidia-smi CSV ------------------------------------------------------------

_NOT_A_VALUE = {"[N/A]", "N/A", "[Not Supported]", ""}


def _csv_rows(text: str, result: ParseResult):
    """(line number, {column: value}) of ``--format=csv`` output (header needed).

    Columns are keyed by name without the unit (``time [ms]`` → ``time``); a
    value keeps its unit (``8110 ms``) for the caller to check.
    """
    header: list[str] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        values = [v.strip() for v in line.split(", ")]
        if header is None:
            header = [re.sub(r"\s*\[[^\]]*\]$", "", v) for v in values]
            continue
        if len(values) != len(header):
            result.error(number, f"expected {len(header)} fields, found {len(values)}")
            continue
        yield number, dict(zip(header, values, strict=True))
    if header is None:
        result.error(1, "empty input: no header line (use --format=csv, not noheader)")


def _number(value: str, unit: str, column: str) -> float:
    text = value.strip()
    if text.endswith(" " + unit):
        text = text[: -len(unit) - 1]
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{column} {value!r} is not a number of {unit}") from None


def _smi_time(text: str, tz: tzinfo) -> datetime:
    try:
        naive = datetime.strptime(text.strip(), "%Y/%m/%d %H:%M:%S.%f")
    except ValueError:
        raise ValueError(f"timestamp {text!r} is not YYYY/MM/DD HH:MM:SS.mmm") from None
    return naive.replace(tzinfo=tz).astimezone(UTC)


TenantOf = Callable[[Mapping[str, str]], str | None]


def tenant_lookup(mapping: Mapping[str, str], default: str | None = None) -> TenantOf:
    """A row's tenant by its GPU's UUID, PCI bus id or index, else ``default``."""

    def tenant_of(row: Mapping[str, str]) -> str | None:
        for column in ("gpu_uuid", "uuid", "gpu_bus_id", "pci.bus_id", "index"):
            value = row.get(column)
            if value and value in mapping:
                return mapping[value]
        return default

    return tenant_of


ACCOUNTED_COLUMNS = ("timestamp", "gpu_name", "gpu_uuid", "pid", "time")


def parse_accounted_apps(
    text: str,
    *,
    tenant_of: TenantOf,
    tz: tzinfo = UTC,
    gpu_models: GpuModels | None = None,
) -> ParseResult:
    """``--query-accounted-apps`` → one record per finished process on one GPU.

    ``time [ms]`` is how long the process's context was active; it is 0 while
    the process still runs (skipped, reported). The record ends at the query's
    ``timestamp`` and lasts the active time rounded up to a second; its
    GPU-seconds are the active time rounded half up. The query's timestamp is
    not part of ``record_id`` (``nvml-<gpu_uuid>-<pid>-<time_ms>``): the same
    process seen by a later query is the same record.
    """
    result = ParseResult()
    gpu_models = gpu_models or GpuModels()
    for number, row in _csv_rows(text, result):
        missing = [c for c in ACCOUNTED_COLUMNS if c not in row]
        if missing:
            result.error(number, "columns missing: " + ", ".join(missing))
            return result
        try:
            time_ms = int(_number(row["time"], "ms", "time"))
            when = _smi_time(row["timestamp"], tz)
        except ValueError as exc:
            result.error(number, str(exc))
            continue
        pid = row["pid"]
        if time_ms == 0:
            result.skipped.append(
                {"line": number, "job_id": pid, "reason": "unfinished"}
            )
            continue
        tenant = tenant_of(row)
        if tenant is None:
            result.error(number, f"GPU {row['gpu_uuid']} is mapped to no tenant")
            continue
        model = gpu_models.resolve(row["gpu_name"])
        if model is None:
            result.error(
                number, f"GPU {row['gpu_name']!r} is no model of this data centre"
            )
            continue
        span = max(1, math.ceil(time_ms / 1000))
        result.add(
            number,
            {
                "record_id": f"nvml-{row['gpu_uuid']}-{pid}-{time_ms}",
                "tenant_id": tenant,
                "voucher_code": None,
                "gpu_model": model,
                "gpu_count": 1,
                "started_at": format_ts(when - timedelta(seconds=span)),
                "ended_at": format_ts(when),
                "gpu_seconds": (time_ms + 500) // 1000,
                "source": "nvml",
                "job_id": pid,
                "correction_of": None,
            },
        )
    return result


def parse_gpu_samples(
    text: str,
    *,
    interval_s: int,
    tenant_of: TenantOf,
    tz: tzinfo = UTC,
    gpu_models: GpuModels | None = None,
    busy_threshold_pct: float = 1.0,
) -> ParseResult:
    """``--query-gpu=timestamp,uuid,name,utilization.gpu`` samples → usage.

    The sampler runs the query every ``interval_s`` seconds. A GPU whose
    ``utilization.gpu`` reaches ``busy_threshold_pct`` in a sample was busy for
    the ``interval_s`` before it: one record of ``interval_s`` GPU-seconds for
    that GPU's tenant, ``record_id`` ``nvml-sample-<uuid>-<epoch>`` so a sample
    sent twice counts once. Idle GPUs and GPUs mapped to no tenant yield
    nothing (counted in ``ignored``). Utilization ``[N/A]`` (MIG mode) is an
    error: the sampler cannot tell busy from idle there.
    """
    result = ParseResult()
    gpu_models = gpu_models or GpuModels()
    for number, row in _csv_rows(text, result):
        missing = [
            c for c in ("timestamp", "uuid", "name", "utilization.gpu") if c not in row
        ]
        if missing:
            result.error(number, "columns missing: " + ", ".join(missing))
            return result
        if row["utilization.gpu"] in _NOT_A_VALUE:
            result.error(
                number,
                f"utilization.gpu is {row['utilization.gpu']} (MIG or unsupported): "
                "busy or idle cannot be told",
            )
            continue
        try:
            utilisation = _number(row["utilization.gpu"], "%", "utilization.gpu")
            when = _smi_time(row["timestamp"], tz).replace(microsecond=0)
        except ValueError as exc:
            result.error(number, str(exc))
            continue
        if utilisation < busy_threshold_pct:
            result.ignore("idle_samples")
            continue
        tenant = tenant_of(row)
        if tenant is None:
            result.ignore("samples_without_tenant")
            continue
        model = gpu_models.resolve(row["name"])
        if model is None:
            result.error(number, f"GPU {row['name']!r} is no model of this data centre")
            continue
        epoch = int(when.timestamp())
        result.add(
            number,
            {
                "record_id": f"nvml-sample-{row['uuid']}-{epoch}",
                "tenant_id": tenant,
                "voucher_code": None,
                "gpu_model": model,
                "gpu_count": 1,
                "started_at": format_ts(when - timedelta(seconds=interval_s)),
                "ended_at": format_ts(when),
                "gpu_seconds": interval_s,
                "source": "nvml",
                "job_id": None,
                "correction_of": None,
            },
        )
    return result
