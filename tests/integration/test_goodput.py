"""Goodput across real attempts: preempted (SIGTERM, 2 ranks), killed (SIGKILL, 1 rank), finished; on S3 with
`--checkpoint-every auto` through a delaying proxy; bad values of the new flags."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, base_env, call_cli, kill_group, run_forked, start_torchrun, wait_for

FLAGS = ["--dataset", "digits", "--model", "mlp", "--width", "32", "--batch-size", "8", "--log-every", "1",
         "--epochs", "1000", "--no-progress"]


def record(run_dir: Path, generation: int) -> list[dict]:
    path = run_dir / "_goodput" / f"g{generation:06d}.jsonl"
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def trained_past_commit(run_dir: Path, generation: int, steps: int) -> bool:
    """The attempt has trained `steps` steps past its newest commit (read from its own record)."""
    events = record(run_dir, generation)
    commits = [e["step"] for e in events if e["e"] == "commit"]
    trained = [row[0] for e in events if e["e"] == "steps" for row in e["s"]]
    return bool(commits and trained) and max(trained) >= max(commits) + steps


@pytest.mark.timeout(420)
def test_preempted_killed_finished_after_a_world_size_change(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["train", "--run-dir", str(run_dir), *FLAGS]
    # attempt 1: 2 ranks, SIGTERM once a checkpoint is committed -> preempted
    proc = start_torchrun(2, [*common, "--checkpoint-every", "10", "--max-steps", "100000"],
                          log_path=tmp_path / "first.log")
    try:
        wait_for(lambda: list(run_dir.glob("ckpt-*/manifest.json")) or proc.poll() is not None, 240,
                 interval=0.02, what="attempt 1's first commit")
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        kill_group(proc, signal.SIGTERM)
        proc.wait(120)
    finally:
        kill_group(proc)
    # attempt 2: 1 rank, saves only at epoch ends; SIGKILL 15 steps after a commit -> killed, work lost
    with open(tmp_path / "second.log", "w") as log:
        proc = subprocess.Popen([PYTHON, "-m", "dist_train", *common, "--checkpoint-every", "100000",
                                 "--max-steps", "100000"], stdout=log, stderr=subprocess.STDOUT, env=base_env(),
                                cwd=REPO, start_new_session=True)
        try:
            wait_for(lambda: trained_past_commit(run_dir, 2, 15) or proc.poll() is not None, 240, interval=0.01,
                     what="attempt 2 training past its commit")
            assert proc.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
            kill_group(proc, signal.SIGKILL)
            proc.wait(30)
        finally:
            kill_group(proc)
    killed_metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                      if line.strip().endswith("}")]
    commits = sorted(int(p.parent.name.rsplit("-s", 1)[1]) for p in run_dir.glob("ckpt-g0002-*/manifest.json"))
    # attempt 3: 1 rank, to the end
    last = max(r["step"] for r in killed_metrics if "split" in r) + 5
    third = run_forked([*common, "--checkpoint-every", "100000", "--max-steps", str(last), "--tensorboard"],
                       timeout=240)
    assert third.returncode == 0, third.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    reader = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    reader.Reload()
    assert {"goodput/goodput", "goodput/badput_lost_work_s"} <= set(reader.Tags()["scalars"])
    assert 0 < reader.Scalars("goodput/goodput")[-1].value < 1

    code, out, err = call_cli(["report", str(run_dir), "--json", "--no-plot"], capsys)
    assert code == 0, err
    report = json.loads(out)
    attempts = report["attempts"]
    assert [a["ended"] for a in attempts] == ["preempted", "killed", "finished"]
    assert [a["world_size"] for a in attempts] == [2, 1, 1]
    assert [a["generation"] for a in attempts] == [1, 2, 3]
    total = report["productive_s"] + sum(report["badput_s"].values())
    assert total == pytest.approx(report["elapsed_s"], rel=1e-6, abs=1e-3)
    assert report["goodput"] == pytest.approx(report["productive_s"] / report["elapsed_s"])
    assert attempts[0]["steps_lost"] == 0 and attempts[2]["steps_lost"] == 0
    assert attempts[1]["steps_lost"] >= 15 and attempts[1]["badput_s"]["lost_work"] > 0
    assert attempts[0]["badput_s"]["lost_work"] == 0 and attempts[2]["badput_s"]["lost_work"] == 0
    assert attempts[2]["resumed_step"] == commits[-1]
    # the steps attempt 2 trained after its last commit, timed from its metrics lines (one a step)
    lines = {r["step"]: r["time"] for r in killed_metrics if r.get("generation") == 2 and r.get("split") == "train"}
    after = sorted(s for s in lines if s > commits[-1])
    assert attempts[1]["steps_lost"] >= len(after) >= 15
    per_step = (lines[after[-1]] - lines[after[0]]) / (len(after) - 1)
    expected = per_step * attempts[1]["steps_lost"]
    assert 0.5 * expected <= report["badput_s"]["lost_work"] <= 1.5 * expected, (report["badput_s"], expected)

    code, out, err = call_cli(["report", str(run_dir)], capsys)  # no --out: into the run dir, and said so
    assert code == 0, err
    assert f"report written to {run_dir / 'report.png'}" in out and "goodput" in out
    assert "attempt 2        killed" in out
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("value", [["--checkpoint-every", "0"], ["--mtbf", "-1"], ["--checkpoint-every", "10x"]])
def test_bad_interval_values_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, value):
    code, out, err = call_cli(["train", "--run-dir", str(tmp_path / "run"), *value], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("dist-train: error: ")
    assert not (tmp_path / "run").exists()


def s3_record(client, bucket: str) -> list[dict]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix="run/_goodput/").get("Contents", [])
    events = []
    for item in sorted(listing, key=lambda i: i["Key"]):
        body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode()
        events.extend(json.loads(line) for line in body.splitlines() if line.strip())
    return events


@pytest.mark.timeout(300)
def test_auto_interval_on_s3_follows_the_save_cost_through_a_slower_store(tmp_path, capsys, s3_env, s3_bucket,
                                                                       moto_endpoint):
    import boto3
    from support.fault_proxy import FaultProxy

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    bounds = ("5", "100000")
    with FaultProxy(moto_endpoint, seed=3) as proxy:
        log_path = tmp_path / "train.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [PYTHON, "-m", "dist_train", "train", "--run-dir", f"s3://{s3_bucket}/run", *FLAGS,
                 "--checkpoint-every", "auto", "--mtbf", "60s", "--checkpoint-every-min", bounds[0],
                 "--checkpoint-every-max", bounds[1], "--max-steps", "1000000"],
                stdout=log, stderr=subprocess.STDOUT, env=base_env({**s3_env, "AWS_ENDPOINT_URL": proxy.url}),
                cwd=REPO, start_new_session=True)
            try:
                def intervals() -> list[dict]:
                    return [e for e in s3_record(client, s3_bucket) if e["e"] == "interval"]

                def measured() -> list[dict]:
                    return [e for e in intervals() if e["cost_s"] != 1.0]  # 1.0: the prior before any save

                fast = wait_for(lambda: measured() or proc.poll() is not None, 180, interval=0.2,
                                what="an interval from a measured save")
                assert proc.poll() is None, log_path.read_text()[-3000:]
                proxy.stall_seconds = 0.4
                proxy.configure(stall=1.0)  # every request to the store now waits 0.4 s
                slow = wait_for(lambda: [e for e in measured() if e["cost_s"] > 3 * fast[-1]["cost_s"]]
                                or proc.poll() is not None, 180, interval=0.2, what="an interval from a slow save")
                assert proc.poll() is None, log_path.read_text()[-3000:]
                proxy.configure(stall=0.0)
                kill_group(proc, signal.SIGTERM)
                proc.wait(120)
            finally:
                kill_group(proc)
    text = log_path.read_text()
    assert "checkpoint interval" in text and "MTBF 60s (flag)" in text
    assert slow[-1]["interval_s"] > fast[-1]["interval_s"]
    for event in intervals():
        low, high = event["min_s"], event["max_s"]
        assert low <= event["interval_s"] <= high
        assert event["mtbf_s"] == 60.0 and event["step_time_s"] > 0
        assert low == pytest.approx(5 * event["step_time_s"]) and high == pytest.approx(100000 * event["step_time_s"])

    code, out, err = call_cli(["report", f"s3://{s3_bucket}/run", "--json", "--out", str(tmp_path / "r.png")], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert [a["ended"] for a in report["attempts"]] == ["preempted"]
    assert report["productive_s"] + sum(report["badput_s"].values()) == pytest.approx(report["elapsed_s"], abs=1e-3)
    assert report["badput_s"]["checkpoint"] > 0 and report["attempts"][0]["steps_lost"] == 0
    assert len(report["intervals"]) >= 2
    metrics = client.get_object(Bucket=s3_bucket, Key="run/metrics.jsonl")["Body"].read().decode()
    assert '"event": "checkpoint_interval"' in metrics
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
