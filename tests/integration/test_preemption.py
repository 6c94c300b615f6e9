"""Preemption without a launcher in the way: the ranks themselves get the signals.

Two `python -m dist_train train` processes with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so each rank's own exit status can be read.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, TINY, base_env, call_cli, free_port, manifests, wait_for
from dist_train.errors import EXIT_PREEMPTED


def start_ranks(run_dir: Path, tmp_path: Path, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = base_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([PYTHON, "-m", "dist_train", "train", "--run-dir", str(run_dir), *TINY,
                                       "--epochs", "50", "--checkpoint-every", "5", *extra],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_sigusr1_to_every_rank_commits_and_exits_preempted(tmp_path):
    run_dir = tmp_path / "run"
    procs = start_ranks(run_dir, tmp_path)
    try:
        wait_for(lambda: manifests(run_dir) if run_dir.exists() else None, 90, what="a first checkpoint")
        for proc in procs:
            proc.send_signal(signal.SIGUSR1)
        codes = [proc.wait(60) for proc in procs]
    finally:
        stop_all(procs)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], (tmp_path / "rank0.log").read_text()[-2000:]
    assert manifests(run_dir)[-1]["reason"] == "preempted"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_rank_stuck_in_a_collective_leaves_by_the_deadline_without_harm(tmp_path, capsys):
    """Rank 1 is frozen (SIGSTOP); rank 0 gets SIGTERM and cannot agree with it: the deadline ends it."""
    run_dir = tmp_path / "run"
    procs = start_ranks(run_dir, tmp_path, "--preempt-deadline", "3")
    try:
        wait_for(lambda: manifests(run_dir) if run_dir.exists() else None, 90, what="a first checkpoint")
        procs[1].send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        signalled = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        code = procs[0].wait(60)
        waited = time.monotonic() - signalled
    finally:
        stop_all(procs)
    log = (tmp_path / "rank0.log").read_text()
    assert code == EXIT_PREEMPTED and "deadline" in log, log[-2000:]
    assert waited >= 2.5, "it should have waited for the deadline, not given up at once"
    code, out, _ = call_cli(["ckpt", "verify", str(run_dir)], capsys)
    assert code == 0, out
