"""No worker outlives its torchrun agent.

torchrun puts every worker in a session of its own, so an agent killed with SIGKILL (the OOM killer,
`kill -9`, a lost container) used to leave its workers training and committing checkpoints into a run
dir that the restarted job may already own. A worker now notices its agent is gone and takes the
preemption path: commit a checkpoint at the next step boundary (or give up at the deadline), exit.

The job is real (plain torchrun, 2 ranks, the CLI with storage hooks): rank 0 is held inside a
save, the agent is SIGKILLed, the save is released, and every worker must be gone within a deadline,
leaving only valid checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, alive, base_env, descendants, run_forked, wait_for

HOOKED_CLI = REPO / "tests" / "support" / "hooked_cli.py"
# The save at step 3 holds at its last data file: model and optimizer files are written, no manifest yet.
PAUSE_AT = "write:*ckpt-g0001-s0000000003*/trainer.safetensors"
GONE_MESSAGE = "the torchrun agent (pid"


def _is_worker(pid: int) -> bool:
    try:
        return str(HOOKED_CLI).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _reap(agent: subprocess.Popen, workers: list[int]) -> None:
    """Whatever a failed test left alive (pids checked again: one may have been reused)."""
    for pid in [agent.pid, *workers]:
        if (pid == agent.pid or _is_worker(pid)) and alive(pid):
            os.kill(pid, signal.SIGKILL)
    agent.wait(timeout=10)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_workers_stop_when_the_agent_is_killed_during_a_save(tmp_path):
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.log"
    paused, release = tmp_path / "paused", tmp_path / "release"
    env = base_env({"DT_HOOK_PAUSE": PAUSE_AT, "DT_HOOK_PAUSED": str(paused), "DT_HOOK_RELEASE": str(release)})
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HOOKED_CLI),
           "train", "--run-dir", str(run_dir), "--epochs", "1000", "--max-steps", "100000", "--checkpoint-every",
           "1", "--batch-size", "32", "--log-every", "100", "--no-progress", "--preempt-deadline", "60"]
    with open(log_path, "w") as log:
        agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                 start_new_session=True)
    workers: list[int] = []
    try:
        wait_for(lambda: Path(f"{paused}.0").exists() or agent.poll() is not None, timeout=150,
                 what="rank 0 to be inside the save of step 3")
        assert agent.poll() is None, log_path.read_text()[-3000:]
        workers = [pid for pid in descendants(agent.pid) if _is_worker(pid)]
        assert len(workers) == 2, (workers, log_path.read_text()[-3000:])

        agent.send_signal(signal.SIGKILL)  # the agent only: its workers live in sessions of their own
        agent.wait(timeout=10)
        release.with_name(f"{release.name}.0").touch()  # the save in progress may finish now
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout=90, what="every worker to exit")
    finally:
        _reap(agent, workers)
    output = log_path.read_text()
    # each worker stops: by its own watch, or by its peer's preemption vote, whichever comes first
    assert output.count(GONE_MESSAGE) >= 1 and "Traceback" not in output, output[-3000:]

    verify = run_forked(["ckpt", "verify", str(run_dir)])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    listed = json.loads(run_forked(["ckpt", "list", str(run_dir), "--json"]).stdout)
    assert listed and all(row["valid"] for row in listed)
    steps = [row["step"] for row in listed]
    assert 3 in steps, steps  # the save that was in progress when the agent died was finished...
    newest = listed[-1]
    assert newest["save_reason"] == "preempted" and newest["step"] > 3, listed  # ...then the preemption path


def _imports_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_workers_stop_when_the_agent_is_killed_while_they_start(tmp_path):
    """Killed while its workers still import torch: they must notice, not wait on its dead store."""
    log_path = tmp_path / "job.log"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HOOKED_CLI),
           "train", "--run-dir", str(tmp_path / "run"), "--max-steps", "5", "--no-progress"]
    with open(log_path, "w") as log:
        agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=base_env(), cwd=REPO,
                                 start_new_session=True)
    workers: list[int] = []
    try:
        def importing() -> bool:  # both workers are loading torch: the agent watch has not started yet
            workers[:] = [pid for pid in descendants(agent.pid) if _is_worker(pid)]
            return len(workers) == 2 and all(_imports_torch(pid) for pid in workers) or agent.poll() is not None
        wait_for(importing, timeout=60, interval=0.01, what="both workers to start importing torch")
        assert agent.poll() is None, log_path.read_text()[-3000:]
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout=60, what="every worker to exit")
    finally:
        _reap(agent, workers)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("ckpt-*"))
