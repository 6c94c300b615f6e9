"""A hand-written loop (examples/ddp_loop.py) with a real DataLoader resumes bit-exactly, and stops with its agent.

The loop is the documented recipe: `dist_train.ResumableSampler` as the DataLoader's batch
sampler (saved as a state entry), the loader's own generator, `CheckpointManager`. A plain
`DistributedSampler` starts the epoch over after a restore, and a loader without its own
generator draws its workers' seed from the restored global RNG: both diverge.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import PYTHON, REPO, alive, base_env, descendants, final_digest, manifests, wait_for

HAND_LOOP = REPO / "tests" / "support" / "hand_loop.py"
LOOP_FLAGS = ["--steps", "120", "--batch-size", "8", "--save-every", "10", "--workers", "1"]
GONE_MESSAGE = "the torchrun agent (pid"


def _torchrun(args: list[str]) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HAND_LOOP), *args]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun(args), capture_output=True, text=True, env=base_env(env), cwd=REPO, timeout=240)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_sigkilled_hand_written_loop_with_a_dataloader_resumes_bit_exactly(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # 960 samples / (2 ranks x 8) = 60 steps an epoch; rank 0 dies at the save of step 50: step 40 is the
    # newest checkpoint, two thirds into epoch 0, and steps 41-50 are redone by the restart.
    # The uninterrupted run and the killed one run side by side.
    jobs = [subprocess.Popen(_torchrun(["--run-dir", str(folder), *LOOP_FLAGS]), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=base_env(env), cwd=REPO)
            for folder, env in ((whole, None), (killed, {"HAND_LOOP_KILL_AT": "50"}))]
    (done, done_err), (crash, _) = [(job, job.communicate(timeout=240)[1]) for job in jobs]
    assert done.returncode == 0, done_err[-3000:]
    assert crash.returncode != 0
    assert manifests(killed)[-1]["step"] == 40
    resumed = _run(["--run-dir", str(killed), *LOOP_FLAGS])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert manifests(whole)[-1]["step"] == manifests(killed)[-1]["step"] == 120
    assert manifests(killed)[-1]["entries"] == ["model", "optimizer", "sampler"]
    assert final_digest(killed) == final_digest(whole)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_hand_written_loop_workers_stop_when_their_torchrun_agent_is_killed(tmp_path):
    run_dir, log_path = tmp_path / "run", tmp_path / "job.log"
    with open(log_path, "w") as log:
        agent = subprocess.Popen(_torchrun(["--run-dir", str(run_dir), "--steps", "10000000", "--batch-size", "8",
                                            "--save-every", "5", "--workers", "0"]),
                                 stdout=log, stderr=subprocess.STDOUT, env=base_env(), cwd=REPO,
                                 start_new_session=True)
    workers: list[int] = []
    try:
        wait_for(lambda: manifests(run_dir) or agent.poll() is not None, timeout=150, what="a first checkpoint")
        assert agent.poll() is None, log_path.read_text()[-3000:]
        workers = [pid for pid in descendants(agent.pid) if _parent(pid) == agent.pid]
        assert len(workers) == 2, workers
        agent.send_signal(signal.SIGKILL)  # the agent only: its workers live in sessions of their own
        agent.wait(timeout=10)
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout=90, what="every worker to exit")
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
    assert GONE_MESSAGE in log_path.read_text()


def test_resumable_sampler_continues_a_dataloader_at_the_exact_next_sample():
    from dist_train import ResumableSampler

    data = TensorDataset(torch.arange(21))

    def epoch_of(sampler, steps=None):
        seen = []
        for (batch,) in DataLoader(data, batch_sampler=sampler, num_workers=0):
            seen += batch.tolist()
            sampler.advance()
            if steps is not None and len(seen) >= steps * 4:
                break
        return seen

    ranks = [ResumableSampler(21, 4, seed=3, world_size=2, rank=r) for r in range(2)]
    whole = [epoch_of(s) for s in ranks]
    assert sorted(whole[0] + whole[1])[:21] == list(range(21))  # each sample once; padding repeats a real one
    assert all(i >= 0 for i in whole[0] + whole[1])

    first = ResumableSampler(21, 4, seed=3, world_size=2, rank=0)
    head = epoch_of(first, steps=1)
    state = first.state_dict()
    again = ResumableSampler(21, 4, seed=3, world_size=2, rank=0)
    again.load_state_dict(state)
    assert head + epoch_of(again) == whole[0]


def test_a_second_save_of_the_same_step_says_its_reason_is_dropped(tmp_path, caplog):
    from dist_train import CheckpointManager

    model = torch.nn.Linear(2, 2)
    mgr = CheckpointManager(str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="dist_train.checkpoint.manager"):
        mgr.save(3, {"model": model}, reason="epoch_end")
        mgr.save(3, {"model": model}, reason="best")
    mgr.close()
    assert [m["reason"] for m in manifests(Path(tmp_path / "run"))] == ["epoch_end"]
    assert any("'best'" in r.getMessage() and "'epoch_end'" in r.getMessage() for r in caplog.records)
