"""Each parser on real tool output (tests/fixtures, see PROVENANCE.md).

Every GPU-seconds figure below was worked out by hand from the sample's own
columns (sacct's Elapsed, nvidia-smi's ``time [ms]``), not from the parser.
"""

from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.datacenter_gateway.parsers import (
    GpuModels,
    parse_accounted_apps,
    parse_alloc_tres,
    parse_gpu_samples,
    parse_sacct,
    tenant_lookup,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
HB_COLUMNS = (
    "JobID,JobName,User,Partition,NodeList,NNodes,NCPUs,NTasks,State,Submit,Start,"
    "End,Timelimit,Elapsed,TotalCPU,CPUTime,UserCPU,SystemCPU,ReqMem,MaxRSS,"
    "MaxVMSize,ReqTRES,AllocTRES,TRESUsageInMax,TRESUsageInTot,TRESUsageOutTot,"
    "MaxDiskRead,MaxDiskWrite,MaxRSSNode,MaxRSSTask,MaxVMSizeNode,MaxVMSizeTask,"
    "MaxDiskReadNode,MaxDiskReadTask,MaxDiskWriteNode,MaxDiskWriteTask,Comment"
).split(",")


def hb_sacct():
    return parse_sacct(
        (FIXTURES / "slurm/hb-jobinfo__sacct.txt").read_text(),
        columns=HB_COLUMNS,
        delimiter="☃",
        tenant_field="User",  # this capture has no Account column
        tz=ZoneInfo("Europe/Amsterdam"),
    )


def test_sacct_sample_counts_each_gpu_allocation_once():
    result = hb_sacct()
    assert result.errors == []
    by_id = {r["record_id"]: r for r in result.records}
    # Elapsed × GPUs, by hand:
    # 7965768 15:28:22 × 1 = 55702      7946767 11:23:23 × 1 = 41003
    # 7939708 00:00:04 × 1 = 4          8150389 2-21:09:16 × 2 = 497912
    # 8069225 08:45:49 × 1 = 31549      7971484 00:03:53 × 4 = 932 (2 nodes)
    # 7961058 00:40:15 × 2 = 4830
    assert {k: v["gpu_seconds"] for k, v in by_id.items()} == {
        "slurm-7965768": 55702,
        "slurm-7946767": 41003,
        "slurm-7939708": 4,
        "slurm-8150389": 497912,
        "slurm-8069225": 31549,
        "slurm-7971484": 932,
        "slurm-7961058": 4830,
    }
    assert result.gpu_seconds == 631932
    # 7971484's steps (.batch 2 GPUs, .extern, .0 4 GPUs) are not added again.
    assert result.ignored["job_steps"] == 142
    job = by_id["slurm-7971484"]
    assert (job["gpu_count"], job["gpu_model"], job["tenant_id"]) == (
        4,
        "a100",
        "user46",
    )
    # Local CEST (UTC+2) → UTC.
    assert job["started_at"] == "2024-04-05T14:15:39Z"
    assert job["ended_at"] == "2024-04-05T14:19:32Z"


def test_sacct_sample_reports_unfinished_jobs_incl_array_tasks():
    skipped = {(s["job_id"], s["state"]) for s in hb_sacct().skipped}
    assert ("8322514_33", "RUNNING") in skipped  # an array task still running
    assert ("8298012", "RUNNING") in skipped
    assert ("8323312", "PENDING") in skipped
    assert len(skipped) == 10


def test_sacct_parsable2_with_header_arrays_and_accounts():
    text = (
        "JobID|Account|State|Start|End|AllocTRES\n"
        "100_1|acme|COMPLETED|2025-03-01T10:00:00|2025-03-01T11:00:00|"
        "cpu=4,gres/gpu:h800=8,gres/gpu=8\n"
        "100_1.batch|acme|COMPLETED|2025-03-01T10:00:00|2025-03-01T11:00:00|"
        "cpu=4,gres/gpu:h800=8,gres/gpu=8\n"
        "100_2|acme|COMPLETED|2025-03-01T10:00:00|2025-03-01T10:30:00|gres/gpu=2\n"
        "101|beta|TIMEOUT|2025-03-01T10:00:00|2025-03-01T10:00:10|"
        "gres/gpu:h800=1,gres/gpu:910b=2,gres/gpu=3\n"
    )
    result = parse_sacct(
        text,
        tenants={"acme": "tenant-acme"},
        gpu_models=GpuModels({"910b": "Ascend-910B"}, ["H800", "Ascend-910B"], "H800"),
    )
    assert result.errors == []
    got = {
        r["record_id"]: (r["tenant_id"], r["gpu_model"], r["gpu_seconds"])
        for r in result.records
    }
    assert got == {
        "slurm-100_1": ("tenant-acme", "H800", 8 * 3600),
        "slurm-100_2": ("tenant-acme", "H800", 2 * 1800),
        "slurm-101-h800": ("beta", "H800", 10),
        "slurm-101-910b": ("beta", "Ascend-910B", 20),
    }
    assert result.lines == [2, 4, 5, 5]


def test_sacct_unreadable_lines_are_named_not_guessed():
    text = (
        "JobID|Account|State|Start|End|AllocTRES\n"
        "1|a|COMPLETED|2025-03-01T10:00:00|2025-03-01T11:00:00|gres/gpu=x\n"
        "2|a|COMPLETED\n"
        "3|a|COMPLETED|yesterday|2025-03-01T11:00:00|gres/gpu=1\n"
        "4||COMPLETED|2025-03-01T10:00:00|2025-03-01T11:00:00|gres/gpu=1\n"
    )
    result = parse_sacct(text)
    assert [e["line"] for e in result.errors] == [2, 3, 4, 5]
    assert parse_sacct("JobID|State\n1|COMPLETED\n").errors[0]["line"] == 1


def test_alloc_tres_ignores_gpu_memory_and_utilisation_tres():
    assert parse_alloc_tres("cpu=8,gres/gpumem=20G,gres/gpuutil=90") == {}
    assert parse_alloc_tres("billing=8,gres/gpu=1,mem=10G") == {None: 1}


@pytest.mark.parametrize(
    "name, gpu_seconds, records, unfinished",
    [
        # 8110+39376+42479+42532+42571+41397 ms → 8+39+42+43+43+41 s
        (
            "nvidia_gpu_exporter__nvidia-h200-mig__590.48.01__load_query-accounted-apps.csv",
            216,
            6,
            0,
        ),
        # 5270+5096+153712 ms → 5+5+154 s; two processes still running (0 ms)
        (
            "nvidia_gpu_exporter__nvidia-l40s__595.80__load_query-accounted-apps.csv",
            164,
            3,
            2,
        ),
        # header only: accounting found no process
        (
            "nvidia_gpu_exporter__nvidia-h100-80gb-hbm3__590.48.01__load_query-accounted-apps.csv",  # noqa: E501
            0,
            0,
            0,
        ),
    ],
)
def test_accounted_apps_samples(name, gpu_seconds, records, unfinished):
    result = parse_accounted_apps(
        (FIXTURES / "nvidia-smi" / name).read_text(),
        tenant_of=tenant_lookup({}, default="lab-7"),
    )
    assert result.errors == []
    assert result.gpu_seconds == gpu_seconds
    assert len(result.records) == records
    assert len(result.skipped) == unfinished
    for record in result.records:
        assert record["gpu_count"] == 1 and record["tenant_id"] == "lab-7"


def test_accounted_apps_without_a_tenant_is_an_error_per_line():
    name = "nvidia_gpu_exporter__nvidia-l40s__595.80__load_query-accounted-apps.csv"
    result = parse_accounted_apps(
        (FIXTURES / "nvidia-smi" / name).read_text(), tenant_of=tenant_lookup({})
    )
    assert [e["line"] for e in result.errors] == [2, 3, 4]


def test_gpu_samples():
    uuid = "GPU-00000000-0000-0000-0000-000000000000"
    tenant_of = tenant_lookup({uuid: "acme"})
    # H200 under load: utilization 100 % → one busy interval of 30 s.
    busy = parse_gpu_samples(
        (
            FIXTURES
            / "nvidia-smi/nvidia_gpu_exporter__nvidia-h200__590.48.01__load_query-gpu.csv"  # noqa: E501
        ).read_text(),
        interval_s=30,
        tenant_of=tenant_of,
        gpu_models=GpuModels(inventory=["H200"]),
    )
    assert busy.errors == [] and busy.gpu_seconds == 30
    assert busy.records[0]["gpu_model"] == "H200"
    assert busy.records[0]["ended_at"] == "2026-07-03T22:11:09Z"
    # H100 in MIG mode: utilization [N/A] — reported, not guessed.
    mig = parse_gpu_samples(
        (
            FIXTURES
            / "nvidia-smi/nvidia_gpu_exporter__nvidia-h100-mig__590.48.01__load_query-gpu.csv"  # noqa: E501
        ).read_text(),
        interval_s=30,
        tenant_of=tenant_of,
    )
    assert [e["line"] for e in mig.errors] == [2] and mig.records == []
    # L40S "idle" capture shows 100 % utilization: counted as busy, 15 s.
    l40s = parse_gpu_samples(
        (
            FIXTURES
            / "nvidia-smi/nvidia_gpu_exporter__nvidia-l40s__595.80__idle_query-gpu.csv"  # noqa: E501
        ).read_text(),
        interval_s=15,
        tenant_of=tenant_of,
    )
    assert l40s.gpu_seconds == 15
