"""Resume after any interruption, with real 2-rank torchrun jobs and real signals.

With --deterministic, runs interrupted by SIGTERM or SIGKILL at different moments
(during a step, during an async save, right after a commit, mid-epoch, at an epoch
boundary; the launcher or only a worker signalled) and restarted with the same
command end with the same model_digest as a run that was never interrupted. Sample
logs show every index of every epoch trained on exactly once across preemptions,
also when the world size changes (2 -> 1 -> 2).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import (assert_each_epoch_exactly_once, PYTHON, REPO, TINY, base_env, copy_run, kill_group, manifests, run_forked, run_torchrun, start_torchrun,
                      wait_for)
from dist_train.errors import EXIT_BAD_INPUT

# Dropout makes RNG state matter; width makes a save take long enough to be interrupted.
DET = ["--model", "mlp", "--width", "1024", "--dropout", "0.1", "--epochs", "2", "--batch-size", "16",
       "--checkpoint-every", "5", "--keep-last", "3", "--deterministic", "--no-progress", "--log-every", "5"]


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--run-dir", str(run_dir), *DET, *extra]


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_torchrun(2, train_args(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    final = manifests(run_dir)[-1]
    assert final["step"] == 2 * 40 and final["reason"] == "epoch_end"
    return final["model_digest"]


# -- triggers and interruptions --------------------------------------------------------------

def committed(run_dir: Path, min_step: int = 0, reason: str | None = None, after: int = -1):
    def check():
        for m in manifests(run_dir) if run_dir.exists() else []:
            if m["step"] >= min_step and m["step"] > after and (reason is None or m["reason"] == reason):
                return m
        return None
    return check


def saving(run_dir: Path, after: int = -1):
    """True while a checkpoint past step `after` is being written (its staging folder exists)."""
    def check():
        if not run_dir.exists():
            return False
        return any(int(p.name.split("-s")[1][:10]) > after for p in run_dir.glob(".staging-*"))
    return check


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the torchrun workers, read from /proc."""
    pids: dict[int, int] = {}
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in env:
                pids[int(env[b"RANK"])] = int(child)
    return pids


def interrupt(run_dir: Path, trigger, action: str, log: Path, nproc: int = 2, extra: list[str] = (),
              launcher: list[str] | None = None, timeout: float = 150) -> int:
    """Start the job, wait for `trigger`, then SIGTERM the launcher / SIGTERM rank 1 only / SIGKILL all.

    With `launcher` options the job runs under `dist-train launch` (torchrun's agent with restarts
    that work: plain torchrun's restarted workers can reuse a stale store, pytorch#135712).
    """
    if launcher is None:
        proc = start_torchrun(nproc, train_args(run_dir, *extra), log_path=log)
    else:
        proc = subprocess.Popen([PYTHON, "-m", "dist_train", "launch", "--standalone", "--nproc-per-node",
                                 str(nproc), *launcher, "--", *train_args(run_dir, *extra)],
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=base_env(), cwd=REPO,
                                start_new_session=True)
    try:
        wait_for(trigger, timeout, interval=0.005, what=f"trigger in {log.read_text()[-2000:]}")
        if action == "term":
            proc.send_signal(signal.SIGTERM)
        elif action == "term-worker":
            os.kill(wait_for(lambda: worker_pids(proc).get(1), 10, what="rank 1"), signal.SIGTERM)
        else:
            kill_group(proc, signal.SIGKILL)
        return proc.wait(timeout)
    finally:
        kill_group(proc, signal.SIGKILL)
        proc.wait(10)


def finish(run_dir: Path, nproc: int = 2, extra: list[str] = ()) -> dict:
    result = run_torchrun(nproc, train_args(run_dir, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return manifests(run_dir)[-1]


def last_preempted(run_dir: Path, log: Path) -> dict:
    """The checkpoint a graceful preemption left (it may be the epoch-end one of the same step)."""
    text = log.read_text()
    assert "checkpoint committed, exit status 75" in text, text[-3000:]
    step = int(text.split("preempted at step ")[-1].split(":")[0])
    return next(m for m in manifests(run_dir) if m["step"] == step)


# -- bit-exact resume ---------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(400)
def test_sigterm_and_sigkill_mid_epoch_after_commits_and_during_async_saves(tmp_path, reference_digest):
    """One run interrupted four times; sync and async saves do the same math, so they can alternate."""
    run_dir = tmp_path / "run"
    interrupt(run_dir, committed(run_dir, min_step=12), "term", tmp_path / "a.log")
    first = last_preempted(run_dir, tmp_path / "a.log")
    assert first["sampler"]["position"] > 0, "meant to be mid-epoch"

    interrupt(run_dir, committed(run_dir, after=first["step"]), "kill", tmp_path / "b.log")
    after_kill = manifests(run_dir)[-1]["step"]

    interrupt(run_dir, saving(run_dir, after=after_kill + 2), "term", tmp_path / "c.log",
              extra=["--async-checkpoint"])
    third = last_preempted(run_dir, tmp_path / "c.log")

    interrupt(run_dir, saving(run_dir, after=third["step"] + 3), "kill", tmp_path / "d.log",
              extra=["--async-checkpoint"])
    assert list(run_dir.glob(".staging-*")), "the kill was meant to land during a save"

    assert finish(run_dir, extra=["--async-checkpoint"])["model_digest"] == reference_digest
    assert not list(run_dir.glob(".staging-*")), "the next run cleans up the partial save"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_epoch_boundary_then_worker_only_signal_restarted_by_torchrun(tmp_path, reference_digest):
    run_dir, samples = tmp_path / "run", tmp_path / "samples"
    interrupt(run_dir, committed(run_dir, reason="epoch_end"), "term", tmp_path / "a.log",
              extra=["--sample-log", str(samples)])
    boundary = last_preempted(run_dir, tmp_path / "a.log")
    assert boundary["sampler"]["position"] == 0 or boundary["step"] > 40
    # Only rank 1 is signalled: both ranks agree at the same step, commit, and exit "preempted";
    # the agent (`dist-train launch`, torchrun's agent) restarts them and they resume by themselves.
    code = interrupt(run_dir, committed(run_dir, after=boundary["step"] + 6), "term-worker", tmp_path / "b.log",
                     extra=["--sample-log", str(samples)], launcher=["--max-restarts", "1"])
    assert code == 0, (tmp_path / "b.log").read_text()[-3000:]
    log = (tmp_path / "b.log").read_text()
    assert "SIGTERM received" in log and "resuming from" in log
    assert manifests(run_dir)[-1]["model_digest"] == reference_digest
    assert_each_epoch_exactly_once(samples, epochs=2)


# -- exact-once accounting across world sizes ----------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(300)
def test_exactly_once_across_preemptions_from_2_to_1_to_2_ranks(tmp_path):
    run_dir, samples = tmp_path / "run", tmp_path / "samples"
    # DataLoader workers prefetch ahead of training: the position saved is what was trained on.
    extra = ["--sample-log", str(samples), "--num-workers", "2"]
    interrupt(run_dir, committed(run_dir, min_step=8), "term", tmp_path / "a.log", nproc=2, extra=extra)
    first = last_preempted(run_dir, tmp_path / "a.log")
    assert first["world_size"] == 2 and first["sampler"]["position"] > 0
    interrupt(run_dir, committed(run_dir, after=first["step"] + 10), "term", tmp_path / "b.log", nproc=1,
              extra=extra)
    second = last_preempted(run_dir, tmp_path / "b.log")
    assert second["world_size"] == 1 and second["step"] > first["step"]
    final = finish(run_dir, nproc=2, extra=extra)
    assert final["epoch"] == 2
    assert_each_epoch_exactly_once(samples, epochs=2)
    sizes = {json.loads(l)["world_size"] for p in samples.glob("*.jsonl") for l in p.read_text().splitlines()}
    assert sizes == {1, 2}


# -- choosing what to resume from ----------------------------------------------------------------

@pytest.fixture
def small_run(trained_run) -> Path:
    return trained_run(*TINY, "--max-steps", "20", "--checkpoint-every", "4")


@pytest.mark.timeout(120)
def test_corrupt_newest_checkpoints_are_skipped_with_reasons(small_run, tmp_path):
    run_dir = copy_run(small_run, tmp_path)
    folders = sorted(run_dir.glob("ckpt-*"))
    assert [f.name[-2:] for f in folders] == ["04", "08", "12", "16", "20"]
    model = folders[-1] / "model.safetensors"  # flipped byte
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF
    model.write_bytes(bytes(data))
    trainer = folders[-2] / "trainer.safetensors"  # truncated
    trainer.write_bytes(trainer.read_bytes()[:50])
    (folders[-3] / "manifest.json").write_text("\x00garbage")  # garbage manifest
    result = run_forked(["train", "--run-dir", str(run_dir), *TINY, "--max-steps", "22", "--checkpoint-every", "4"])
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "resuming from" in err and "ckpt-g0001-s0000000008 (step 8" in err
    skipped = [line for line in err.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 3
    assert "s0000000020" in skipped[0] and "sha256" in skipped[0]
    assert "s0000000016" in skipped[1] and "manifest says" in skipped[1]
    assert "s0000000012" in skipped[2] and "JSON" in skipped[2]


@pytest.mark.timeout(120)
def test_rerunning_a_finished_run_keeps_its_checkpoint_history(small_run, tmp_path):
    run_dir = copy_run(small_run, tmp_path)
    before = sorted(f.name for f in run_dir.glob("ckpt-*"))
    for _ in range(2):
        result = run_forked(["train", "--run-dir", str(run_dir), *TINY, "--max-steps", "20", "--checkpoint-every", "4",
                          "--keep-last", "3"])
        assert result.returncode == 0, result.stderr
        assert "finished at step 20" in result.stderr and "committed" not in result.stderr
    assert sorted(f.name for f in run_dir.glob("ckpt-*")) == before


@pytest.mark.timeout(120)
def test_a_checkpoint_of_another_model_is_refused_before_anything_is_written(small_run, tmp_path):
    run_dir = copy_run(small_run, tmp_path)
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    result = run_forked(["train", "--run-dir", str(run_dir), *TINY, "--model", "mlp"])
    assert result.returncode == EXIT_BAD_INPUT
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "cnn" in result.stderr and "mlp" in result.stderr
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before


@pytest.mark.timeout(120)
def test_resume_never_does_not_start_over_beside_existing_checkpoints(small_run, tmp_path):
    run_dir = copy_run(small_run, tmp_path)
    result = run_forked(["train", "--run-dir", str(run_dir), *TINY, "--resume", "never"])
    assert result.returncode == EXIT_BAD_INPUT and "already holds 5 checkpoint" in result.stderr
    assert len(list(run_dir.glob("_attempts/*"))) == 1


@pytest.mark.timeout(120)
def test_resume_from_an_explicit_checkpoint_url_into_a_new_run_dir(small_run, tmp_path):
    source = sorted(small_run.glob("ckpt-*"))[1]
    run_dir = tmp_path / "finetune"
    result = run_forked(["train", "--run-dir", str(run_dir), *TINY, "--max-steps", "12", "--resume", str(source)])
    assert result.returncode == 0, result.stderr
    assert f"resuming from {source}" in result.stderr
    assert [m["step"] for m in manifests(run_dir)][-1] == 12
