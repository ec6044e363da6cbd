"""POST /v1/usage/slurm, /v1/usage/nvidia-smi and tail mode, over a SQLite outbox."""

import json
from datetime import timedelta

from services.common.units import utcnow
from services.datacenter_gateway import parsers
from services.datacenter_gateway.tail import SacctTail

DC = "guian-gov-01"


def sacct(*rows):
    return "JobID|Account|State|Start|End|AllocTRES\n" + "".join(r + "\n" for r in rows)


# One end for every job of the module: the same job written twice (the next
# cron run) must read the same, even across a second's boundary.
END = (utcnow() - timedelta(hours=2)).replace(microsecond=0, tzinfo=None)


def job(job_id, account="acme", state="COMPLETED", hours=1, gpus="gres/gpu:h800=8"):
    end = END
    start = end - timedelta(hours=hours)
    return f"{job_id}|{account}|{state}|{start.isoformat()}|{end.isoformat()}|{gpus}"


def bodies(outbox):
    return {r.record_id: json.loads(r.body) for r in outbox.pending(10_000)}


def test_slurm_post_is_idempotent_and_carries_the_tenant_voucher(
    client, outbox, voucher_code
):
    client.put("/v1/tenants/acme/voucher", json={"voucher_code": voucher_code})
    text = sacct(job("7"), job("7.batch"), job("8", state="RUNNING"), job("9_1", "b"))
    first = client.post("/v1/usage/slurm", data=text)
    assert first.status_code == 202, first.get_json()
    body = first.get_json()
    assert (body["accepted"], body["gpu_seconds"]) == (2, 2 * 8 * 3600)
    assert body["skipped"][0]["job_id"] == "8"
    again = client.post("/v1/usage/slurm", data=text).get_json()
    assert (again["accepted"], again["duplicates"]) == (0, 2)
    stored = bodies(outbox)
    assert stored["slurm-7"]["voucher_code"] == voucher_code
    assert stored["slurm-9_1"]["voucher_code"] is None
    assert stored["slurm-7"]["gpu_model"] == "H800"


def test_slurm_unreadable_lines_are_400_with_line_numbers(client, outbox):
    text = sacct(job("1"), "2|acme|COMPLETED", job("3", gpus="gres/gpu:tpu=1"))
    response = client.post("/v1/usage/slurm", data=text)
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == "unreadable_input"
    assert [e["line"] for e in body["details"]["lines"]] == [3, 4]
    assert outbox.backlog(fresh=True) == 0


def test_nvidia_smi_accounted_apps_seen_twice_count_once(client, outbox):
    now = utcnow() - timedelta(minutes=1)
    header = (
        "timestamp, gpu_name, gpu_bus_id, gpu_serial, gpu_uuid, pid, "
        "gpu_utilization [%], mem_utilization [%], max_memory_usage [MiB], time [ms]\n"
    )

    def query(at):
        stamp = at.strftime("%Y/%m/%d %H:%M:%S.000")
        return (
            header
            + f"{stamp}, NVIDIA H800, 0:1, 0, GPU-1, 42, 9 %, 1 %, 5 MiB, 61500 ms\n"
        )

    first = client.post("/v1/usage/nvidia-smi?tenant=acme", data=query(now))
    assert first.status_code == 202, first.get_json()
    assert first.get_json()["gpu_seconds"] == 62  # 61.5 s rounded half up
    later = client.post(
        "/v1/usage/nvidia-smi?tenant=acme", data=query(now + timedelta(seconds=30))
    )
    assert later.get_json()["duplicates"] == 1
    assert list(bodies(outbox)) == ["nvml-GPU-1-42-61500"]


def test_nvidia_smi_gpu_samples_need_an_interval(client):
    text = (
        "timestamp, uuid, name, utilization.gpu [%]\n"
        "2025/01/01 00:00:00.000, GPU-1, NVIDIA H800, 50 %\n"
    )
    assert client.post("/v1/usage/nvidia-smi?tenant=a", data=text).status_code == 400


def test_tail_resumes_after_restart_without_duplicates(tmp_path, outbox):
    path = tmp_path / "sacct.log"
    path.write_text(sacct(job("1"), job("2", state="RUNNING")))

    def parse(text, columns):
        return parsers.parse_sacct(
            text,
            columns=columns,
            gpu_models=parsers.GpuModels(inventory=["H800"], default="H800"),
        )

    tail = SacctTail(str(path), outbox, DC, parse, ["H800"])
    assert tail.read_once() > 0
    assert set(bodies(outbox)) == {"slurm-1"}
    # The next cron run appends its own header, job 1 again and job 2 finished,
    # plus half a line still being written.
    with path.open("a") as handle:
        handle.write(sacct(job("1"), job("2")) + "3|acme|COMP")
    restarted = SacctTail(str(path), outbox, DC, parse, ["H800"])
    restarted.read_once()
    assert set(bodies(outbox)) == {"slurm-1", "slurm-2"}
    assert restarted.read_once() == 0  # nothing new, nothing read twice
    with path.open("a") as handle:
        handle.write("LETED|2025-01-01T00:00:00|2025-01-01T01:00:00|gres/gpu=1\n")
    restarted.read_once()
    assert set(bodies(outbox)) == {"slurm-1", "slurm-2", "slurm-3"}
    assert outbox.backlog(fresh=True) == 3
