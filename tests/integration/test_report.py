"""`dist-train report` on a real run that was preempted (SIGTERM, exit 75) and resumed to the end."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, base_env, call_cli, kill_group, run_forked, wait_for
from dist_train.errors import EXIT_PREEMPTED
from dist_train.report.history import parse_metrics

TRAIN = ["--max-steps", "120", "--checkpoint-every", "5", "--batch-size", "32", "--log-every", "5", "--no-progress"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """Train, SIGTERM once the first checkpoint is committed, then run the same command to the end."""
    base = tmp_path_factory.mktemp("report")
    run_dir = base / "run"
    command = [PYTHON, "-m", "dist_train", "train", "--run-dir", str(run_dir), *TRAIN]
    with open(base / "first.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=base_env(), cwd=REPO,
                                start_new_session=True)
        try:
            wait_for(lambda: list(run_dir.glob("ckpt-*/manifest.json")) or proc.poll() is not None, timeout=120,
                     what="a committed checkpoint")
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=60)
        finally:
            kill_group(proc)
    assert status == EXIT_PREEMPTED, (base / "first.log").read_text()[-2000:]
    second = run_forked(["train", "--run-dir", str(run_dir), *TRAIN])
    assert second.returncode == 0, second.stderr[-2000:]
    return run_dir


def cli(capsys, *args) -> tuple[int, str, str]:
    return call_cli([str(a) for a in args], capsys)


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.timeout(240)
def test_report_writes_a_png_and_a_summary_for_a_preempted_and_resumed_run(capsys, tmp_path, resumed_run):
    out = tmp_path / "curves.png"
    code, stdout, err = cli(capsys, "report", resumed_run, "--out", out)
    assert code == 0, err
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1500, 650)  # the curves beside the attempt timeline
    assert len(data) > 20_000  # two panels with lines, not an empty canvas

    resumes = [r for r in metrics_lines(resumed_run) if r.get("event") == "resume"]
    assert len(resumes) == 1
    committed = len(list(resumed_run.glob("ckpt-*/manifest.json")))
    assert "steps            120" in stdout
    assert f"attempts         2 (resumed at step {resumes[0]['step']})" in stdout
    assert f"checkpoints      {committed} committed; newest at step 120" in stdout
    assert "best val loss" in stdout and "samples/s" in stdout
    assert f"report written to {out}" in stdout


def test_report_json_summary_uses_the_surviving_attempts_values(capsys, tmp_path, monkeypatch, resumed_run):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli(capsys, "report", resumed_run, "--json", "--no-plot")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []  # --no-plot writes nothing
    summary = json.loads(stdout)
    lines = metrics_lines(resumed_run)
    resume = next(r for r in lines if r.get("event") == "resume")
    assert summary["attempt_count"] == 2 and summary["steps"] == 120
    assert summary["resumes"] == [{"step": resume["step"], "generation": 2, "from": 1}]
    assert summary["newest_checkpoint"]["step"] == 120
    val = [r for r in lines if r.get("split") == "val"]
    best = min(val, key=lambda r: r["loss"])
    assert summary["val"]["best_loss"] == best["loss"] and summary["val"]["best_loss_step"] == best["step"]
    assert summary["train"]["last_step"] == 120


def test_steps_redone_after_a_resume_show_the_later_attempt():
    """Attempt 1 logged steps 10..50 but its last checkpoint was step 30; attempt 2 re-did 40 and 50."""
    def rec(step, gen, loss, split="train"):
        return json.dumps({"step": step, "epoch": 0, "generation": gen, "split": split, "loss": loss,
                           "accuracy": 0.5, "samples_per_sec": 100.0})
    lines = [rec(s, 1, 9.0) for s in (10, 20, 30, 40, 50)] + [rec(30, 1, 8.0, "val")]
    lines += ['{"step": 55, "generation": 1, "spl']  # cut off by SIGKILL
    lines += [json.dumps({"event": "resume", "step": 30, "epoch": 0, "generation": 2, "from": 1})]
    lines += [rec(40, 2, 4.0), rec(60, 1, 99.0), rec(50, 2, 5.0), rec(50, 2, 5.0, "val")]  # 60: a late zombie
    history = parse_metrics("\n".join(lines) + "\n")
    steps, losses = history.series("train", "loss")
    assert steps == [10, 20, 30, 40, 50] and losses == [9.0, 9.0, 9.0, 4.0, 5.0]
    assert history.series("val", "loss") == ([30, 50], [8.0, 5.0])
    assert [(r.step, r.generation) for r in history.resumes] == [(30, 2)]
    assert history.generations == [1, 2] and history.skipped_lines == 1


@pytest.mark.parametrize("case", ["missing run dir", "no metrics", "bad --out", "bad --storage-options"])
def test_report_bad_input_is_one_line_and_exit_2(capsys, tmp_path, case):
    (tmp_path / "empty").mkdir()
    args = {"missing run dir": [tmp_path / "nowhere"], "no metrics": [tmp_path / "empty"],
            "bad --out": [tmp_path / "empty", "--out", tmp_path / "curves.jpg"],
            "bad --storage-options": [tmp_path / "empty", "--storage-options", "[1]"]}[case]
    code, out, err = cli(capsys, "report", *args)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("dist-train: error: ")
    assert not (tmp_path / "curves.jpg").exists()


@pytest.mark.timeout(120)
def test_report_reads_an_s3_run_dir(capsys, tmp_path, s3_env, s3_bucket, resumed_run):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    newest = sorted(resumed_run.glob("ckpt-*"))[-1]
    for path in [resumed_run / "metrics.jsonl", *newest.iterdir()]:
        client.put_object(Bucket=s3_bucket, Key=f"run/{path.relative_to(resumed_run)}", Body=path.read_bytes())
    out = tmp_path / "s3.png"
    code, stdout, err = cli(capsys, "report", f"s3://{s3_bucket}/run", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 120 and summary["checkpoints"] == 1 and summary["attempt_count"] == 2
    assert summary["newest_checkpoint"]["url"] == f"s3://{s3_bucket}/run/{newest.name}"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
