"""Full disk (ENOSPC) and permission denied (EACCES) in the middle of a job.

The policy under test (docs/reliability.md): a failed save is one error line, the partial checkpoint
is removed and never valid, every earlier checkpoint stays valid, training goes on and the next save
tries again; after 3 failed saves in a row the job stops with exit status 1.

The run dir lives on a small tmpfs (root only; skipped elsewhere). The job pauses (storage hook) at
the start of a chosen commit while the test fills the disk with a ballast file or removes write
permission, so the failure hits exactly that checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from support.hooked import HookedJob

JOB = ["train", "--checkpoint-every", "10", "--epochs", "3", "--max-steps", "100", "--batch-size", "32",
       "--log-every", "100", "--no-progress"]


def _commit_start(step: int) -> str:
    return f"makedirs:.staging-ckpt-g0001-s{step:010d}-*"


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def _fill(mountpoint: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free."""
    stat = os.statvfs(mountpoint)
    free = stat.f_bavail * stat.f_frsize
    ballast = mountpoint / "ballast"
    with open(ballast, "wb") as handle:
        handle.truncate(0)
        block = b"\0" * 2**20
        remaining = max(0, free - leave)
        while remaining > 0:
            handle.write(block[:min(len(block), remaining)])
            remaining -= min(len(block), remaining)
    return ballast


def _checkpoint_bytes(run_dir: Path, step: int) -> int:
    folder = run_dir / f"ckpt-g0001-s{step:010d}"
    return sum(p.stat().st_size for p in folder.iterdir())


def _resumes_from(run_dir: Path) -> int:
    from dist_train.checkpoint.manager import CheckpointManager

    payload = CheckpointManager(str(run_dir)).find()  # what `train --resume auto` would load
    return payload.manifest["step"]


def _failure_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line and "checkpoint at step" in line]


@pytest.mark.timeout(180)
def test_full_disk_fails_one_save_cleanly_then_recovers_then_stops(tmpfs, tmp_path):
    run_dir = tmpfs / "run"
    job = HookedJob([*JOB, "--run-dir", str(run_dir)], tmp_path / "job",
                    pauses=[_commit_start(30), _commit_start(40), _commit_start(50)])
    try:
        job.wait_paused(0)
        ballast = _fill(tmpfs, leave=_checkpoint_bytes(run_dir, 20) // 2)  # step 30 cannot fit
        job.release(0)
        job.wait_paused(1)
        assert len(_failure_lines(job.output)) == 1, job.output
        assert not list(run_dir.glob(".staging-*")), "the partial checkpoint was not removed"
        ballast.unlink()  # space is back: the next save must succeed ("warn and go on")
        job.release(1)
        job.wait_paused(2)
        assert (run_dir / "ckpt-g0001-s0000000040" / "manifest.json").exists(), job.output
        _fill(tmpfs, leave=_checkpoint_bytes(run_dir, 20) // 2)  # full for good: 50, 60, 70 fail
        job.release(2)
        status = job.finish()
    finally:
        job.kill()

    output = job.output
    assert status == 1, output
    assert "Traceback" not in output, output
    failures = _failure_lines(output)
    assert [line.split("checkpoint at step ")[1].split()[0] for line in failures] == ["30", "50", "60", "70"], \
        failures
    assert all("No space left on device" in line for line in failures), failures
    assert "stopping: checkpoints could not be committed" in output
    assert not list(run_dir.glob(".staging-*")), "a partial checkpoint was left behind"
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.storage import Storage

    verdicts = catalog.scan(Storage(str(run_dir)))
    assert [(v.ref.step, v.valid) for v in verdicts] == [(10, True), (20, True), (40, True)], \
        [(v.ref.name, v.reason) for v in verdicts]
    assert _resumes_from(run_dir) == 40


@pytest.mark.timeout(180)
def test_permission_denied_fails_saves_cleanly_and_keeps_earlier_checkpoints(tmp_path):
    """Root ignores file modes, so the job runs without CAP_DAC_OVERRIDE (setpriv) to meet a real EACCES."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    probe = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot drop capabilities here")
    run_dir = tmp_path / "run"
    job = HookedJob([*JOB, "--run-dir", str(run_dir)], tmp_path / "job", pauses=[_commit_start(30)],
                    prefix=["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"])
    try:
        job.wait_paused(0)
        run_dir.chmod(0o555)
        job.release(0)
        status = job.finish()
    finally:
        job.kill()
        run_dir.chmod(0o755)

    output = job.output
    assert status == 1, output
    assert "Traceback" not in output, output
    failures = _failure_lines(output)
    assert len(failures) == 3 and all("Permission denied" in line and "(" in line for line in failures), failures
    assert not list(run_dir.glob(".staging-*"))
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.storage import Storage

    verdicts = catalog.scan(Storage(str(run_dir)))
    assert [(v.ref.step, v.valid) for v in verdicts] == [(10, True), (20, True)]
    assert _resumes_from(run_dir) == 20
