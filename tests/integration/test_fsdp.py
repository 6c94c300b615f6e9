"""`dist-train train --parallelism fsdp` end to end (issue 14): real 2-rank torchrun jobs on the default data.

- it learns, and every checkpoint is one manifest listing both ranks' shards that `ckpt verify` passes;
  `evaluate` reads the sharded checkpoint in one process and gets the job's own validation numbers;
- with --deterministic, SIGTERM mid-epoch and SIGKILL right after a commit, each resumed with the
  same command, end with the uninterrupted run's model_digest (gradient accumulation and clipping
  included); a short --async-checkpoint run commits the sync run's digest at every step;
- resharding through the trainer: ddp (2 ranks) -> fsdp (2 ranks) -> fsdp (1 rank) -> fsdp (2 ranks),
  each stage preempted after some progress: the planned steps are finished, every sample of every
  epoch is trained on exactly once, and right after each load the model's digest is the saved one;
- a rank that fails its write (an injected ENOSPC on rank 1 only): no manifest, no partial files
  left, and the next save succeeds.

Jobs that need a test hook run `tests/support/hooked_cli.py` (the real CLI plus DT_HOOK_* hooks)
under torchrun; the rest run `-m dist_train` through conftest's helpers.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import (assert_each_epoch_exactly_once, PYTHON, REPO, base_env, call_cli, kill_group, manifests, run_torchrun, start_torchrun,
                      wait_for)
from dist_train.errors import EXIT_PREEMPTED

HOOKED_CLI = REPO / "tests" / "support" / "hooked_cli.py"
# Dropout makes the RNG state part of what an exact resume must restore; two micro-batches per step
# (FSDP's gradient sync only on the last) and clipping (the global norm over both ranks' shards) run too.
DET = ["--parallelism", "fsdp", "--deterministic", "--epochs", "3", "--lr", "0.003", "--batch-size", "16",
       "--grad-accum", "2", "--grad-clip", "1.0", "--dropout", "0.1", "--checkpoint-every", "4", "--log-every", "5",
       "--no-progress"]
STEPS_PER_EPOCH = 20  # 1257 training samples, 2 ranks x 16 x 2 micro-batches


def train(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--run-dir", str(run_dir), *DET, *extra]


def hooked_cmd(nproc: int, args: list[str]) -> list[str]:
    """The CLI with test hooks: under torchrun for 2 ranks, a plain process for 1."""
    if nproc == 1:
        return [PYTHON, str(HOOKED_CLI), *args]
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(HOOKED_CLI),
            *args]


def start_hooked(nproc: int, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(hooked_cmd(nproc, args), stdout=out, stderr=subprocess.STDOUT, env=base_env(env),
                                cwd=REPO, start_new_session=True)


def committed_after(run_dir: Path, step: int, reason: str | None = None):
    """A poll: the first committed manifest past `step` (of `reason`), or None."""
    def check():
        for manifest in manifests(run_dir) if run_dir.exists() else []:
            if manifest["step"] > step and (reason is None or manifest["reason"] == reason):
                return manifest
        return None
    return check


def stop_when(proc: subprocess.Popen, trigger, sig: int, log: Path, timeout: float = 150) -> int:
    """Wait for `trigger`, signal the job's whole process group (launcher and workers), return its status."""
    try:
        wait_for(lambda: trigger() or proc.poll() is not None, timeout, interval=0.01,
                 what=f"the trigger in {log}")
        assert proc.poll() is None, f"the job ended before the trigger:\n{log.read_text()[-3000:]}"
        kill_group(proc, sig)
        return proc.wait(timeout)
    finally:
        kill_group(proc, signal.SIGKILL)
        proc.wait(10)


def preempted(run_dir: Path, log: Path, code: int) -> dict:
    """The checkpoint a SIGTERM left: the job committed it and exited 'preempted' (75, non-zero)."""
    text = log.read_text()
    assert code != 0 and f"checkpoint committed, exit status {EXIT_PREEMPTED}" in text, text[-3000:]
    step = int(text.split("preempted at step ")[-1].split(":")[0])
    return next(m for m in manifests(run_dir) if m["step"] == step and m["reason"] == "preempted")


def digests(run_dir: Path) -> dict[int, str]:
    return {m["step"]: m["model_digest"] for m in manifests(run_dir)}


# -- 1. it learns; sharded checkpoints verify -------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted deterministic FSDP run (2 ranks) the other tests compare with."""
    run_dir = tmp_path_factory.mktemp("fsdp-reference") / "run"
    result = run_torchrun(2, train(run_dir), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fsdp_on_two_ranks_learns_and_each_manifest_lists_both_ranks_shards(reference, capsys):
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val"]
    assert len(val) == 3 and val[-1]["accuracy"] >= 0.9, val
    code, out, _ = call_cli(["ckpt", "verify", str(reference)], capsys)
    assert code == 0, out
    saved = manifests(reference)
    assert [m["step"] for m in saved][-1] == 3 * STEPS_PER_EPOCH
    for manifest in saved:
        assert manifest["sharded"]["world_size"] == 2 and manifest["world_size"] == 2
        for rank in (0, 1):
            assert {f"shards/rank{rank:05d}/model.safetensors",
                    f"shards/rank{rank:05d}/optimizer.safetensors"} <= set(manifest["files"]), manifest["files"]
    # inference in one process reads the sharded checkpoint and gets the job's own validation numbers
    code, out, err = call_cli(["evaluate", "--checkpoint", str(reference), "--split", "val", "--json"], capsys)
    assert code == 0, err
    evaluated = json.loads(out)
    assert evaluated["accuracy"] == pytest.approx(val[-1]["accuracy"], abs=0.01), (evaluated, val[-1])


# -- 2. bit-exact resume under FSDP; async saves ----------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(400)
def test_sigterm_mid_epoch_then_sigkill_after_a_commit_resume_to_the_uninterrupted_digest(reference, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "a.log"
    proc = start_torchrun(2, train(run_dir), log_path=log)
    code = stop_when(proc, committed_after(run_dir, 3, reason="interval"), signal.SIGTERM, log)
    first = preempted(run_dir, log, code)
    assert first["sampler"]["position"] > 0, "meant to be mid-epoch"

    log = tmp_path / "b.log"
    proc = start_torchrun(2, train(run_dir), log_path=log)
    stop_when(proc, committed_after(run_dir, first["step"]), signal.SIGKILL, log)
    killed_after = manifests(run_dir)[-1]["step"]
    assert "resuming from" in log.read_text() and killed_after > first["step"]

    result = run_torchrun(2, train(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {killed_after}," in result.stderr  # resumed from the checkpoint committed just before the kill
    ours, theirs = digests(run_dir), digests(reference)
    assert manifests(run_dir)[-1]["step"] == 3 * STEPS_PER_EPOCH
    assert ours[3 * STEPS_PER_EPOCH] == theirs[3 * STEPS_PER_EPOCH]
    common = set(ours) & set(theirs)
    assert len(common) >= 10 and all(ours[s] == theirs[s] for s in common), \
        {s: (ours[s], theirs[s]) for s in common if ours[s] != theirs[s]}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_async_checkpoints_under_fsdp_commit_the_sync_runs_digests(reference, tmp_path):
    """A short run (past the first epoch end) with --async-checkpoint: the same digest at every step."""
    run_dir = tmp_path / "run"
    steps = STEPS_PER_EPOCH + 4
    result = run_torchrun(2, train(run_dir, "--async-checkpoint", "--max-steps", str(steps)))
    assert result.returncode == 0, result.stderr[-3000:]
    ours = digests(run_dir)
    assert sorted(ours) == list(range(4, steps + 1, 4))
    assert ours == {step: digest for step, digest in digests(reference).items() if step <= steps}


# -- 3. resharding through the trainer --------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(400)
def test_ddp_to_fsdp_and_fsdp_from_2_to_1_to_2_ranks(tmp_path):
    """Four stages on one run dir, each preempted after a commit of its own (the last one finishes).
    After each load the hook records the model's digest (computed on the live, possibly sharded,
    model): it must equal the model_digest of the checkpoint that was loaded."""
    run_dir, samples, restores = tmp_path / "run", tmp_path / "samples", tmp_path / "restores.jsonl"
    common = ["train", "--run-dir", str(run_dir), "--epochs", "2", "--batch-size", "32", "--lr", "0.003",
              "--checkpoint-every", "3", "--log-every", "5", "--no-progress", "--sample-log", str(samples)]
    env = {"DT_HOOK_RESTORE_LOG": str(restores)}
    stages = [("ddp", 2), ("fsdp", 2), ("fsdp", 1), ("fsdp", 2)]
    resumed_from: list[dict] = []
    step = -1
    for index, (parallelism, nproc) in enumerate(stages):
        log = tmp_path / f"stage{index}.log"
        args = [*common, "--parallelism", parallelism]
        proc = start_hooked(nproc, args, log, env)
        if index == len(stages) - 1:
            try:
                assert proc.wait(240) == 0, log.read_text()[-3000:]
            finally:
                kill_group(proc, signal.SIGKILL)
            break
        code = stop_when(proc, committed_after(run_dir, max(step, 0)), signal.SIGTERM, log)
        saved = preempted(run_dir, log, code)
        assert saved["world_size"] == nproc
        if parallelism == "fsdp":
            assert saved["sharded"]["world_size"] == nproc
        else:
            assert "sharded" not in saved  # ddp keeps rank 0's layout by default
        resumed_from.append(saved)
        step = saved["step"]

    loads = [json.loads(line) for line in restores.read_text().splitlines()]
    assert [(r["step"], r["world_size"]) for r in loads] == [(m["step"], n) for m, (_, n) in
                                                             zip(resumed_from, stages[1:])]
    for loaded, saved in zip(loads, resumed_from):
        assert loaded["digest"] == saved["model_digest"], (loaded, saved["step"])
    final = manifests(run_dir)[-1]
    assert final["epoch"] == 2 and final["sampler"]["position"] == 0 and final["world_size"] == 2
    assert_each_epoch_exactly_once(samples, epochs=2)
    sizes = {json.loads(line)["world_size"] for p in samples.glob("*.jsonl") for line in p.read_text().splitlines()}
    assert sizes == {1, 2}


# -- 4. a rank that fails its write, in a real trainer job -------------------------------------------
# (the library-level test, with S3, is in test_sharded_checkpoints.py; this one goes through the trainer)

@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_rank_that_fails_its_write_commits_nothing_and_the_next_save_succeeds(tmp_path, capsys):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    # rank 1 writes its model shard, then fails on its optimizer shard: both ranks leave partial files
    env = {"DT_HOOK_FAIL": "write:*/shards/rank00001/optimizer.safetensors", "DT_HOOK_RANK": "1"}
    proc = start_hooked(2, ["train", "--run-dir", str(run_dir), "--parallelism", "fsdp", "--max-steps", "9",
                            "--checkpoint-every", "3", "--epochs", "1", "--batch-size", "32", "--log-every", "100",
                            "--no-progress"], log, env)
    try:
        code = proc.wait(240)
    finally:
        kill_group(proc, signal.SIGKILL)
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert "rank 1 could not write its checkpoint share" in output and "(injected)" in output, output[-3000:]
    assert "checkpoint at step 3 failed" in output, output[-3000:]
    # nothing of the failed save is left: no checkpoint folder, no staging folder, no stray file
    names = sorted(p.name for p in run_dir.iterdir())
    assert [n for n in names if n.startswith(("ckpt-", ".staging-"))] == ["ckpt-g0001-s0000000006",
                                                                          "ckpt-g0001-s0000000009"], names
    assert [m["step"] for m in manifests(run_dir)] == [6, 9]
    code, out, _ = call_cli(["ckpt", "verify", str(run_dir)], capsys)
    assert code == 0, out
    assert {"shards/rank00001/model.safetensors"} <= set(manifests(run_dir)[0]["files"])
