"""Cloud preemption notices end to end: a 2-rank torchrun job polls a loopback metadata server.

The server (tests/support/metadata_server.py) answers as each provider documents; it starts
with no notice and then announces one. Every rank must then commit one checkpoint with
reason `notice` within two step boundaries (the step-boundary vote is read one boundary
after it is cast; a notice landing on an epoch's last step finds that step's epoch_end
checkpoint already committed) and train on to the end; with `--exit-on-notice` the job
stops there with exit status 75, a checkpoint committed.

(Named test_preemption_notice.py: tests/unit/test_notice.py has the basename test_notice.py,
and without __init__.py files pytest cannot collect two modules of one name.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, TINY, base_env, kill_group, manifests, start_torchrun, wait_for
from dist_train.errors import EXIT_PREEMPTED
from support.metadata_server import PROBE_PATHS, MetadataServer

# Per-step metrics lines (to place the notice among the steps), and no retention that could remove
# the notice checkpoint. TINY's 2 epochs are about 40 steps: the notice comes within the first few.
JOB = [*TINY, "--log-every", "1", "--keep-last", "100", "--notice-interval", "0.05"]
EPOCHS = int(TINY[TINY.index("--epochs") + 1])
# The notice is served at time T; a rank's watcher sets `seen` a moment later (the HTTP answer, the GIL).
DELIVERY_SLACK_S = 0.05


def steps_logged_by(run_dir: Path, when: float) -> int:
    """The last optimizer step rank 0 had finished (and logged) at time `when`; 0 if none."""
    steps = [0]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "train" and record["time"] <= when:
            steps.append(record["step"])
    return max(steps)


def start_launcher(train: list[str], log_path: Path) -> subprocess.Popen:
    """`dist-train launch --standalone --nproc-per-node 2 -- train ...`: its status is the job's (75 too,
    where plain torchrun says 1)."""
    return subprocess.Popen([PYTHON, "-m", "dist_train", "launch", "--standalone", "--nproc-per-node", "2", "--",
                             *train], stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=base_env(),
                            cwd=REPO, start_new_session=True)


def run_with_notice(provider: str, tmp_path: Path, *extra: str, launcher: bool = False) -> tuple[int, Path, float]:
    """Start the job, announce a notice once the watchers poll, wait for the end: (status, run dir, T)."""
    run_dir, log_path = tmp_path / "run", tmp_path / "job.log"
    with MetadataServer() as server:
        train = ["train", "--run-dir", str(run_dir), *JOB, "--preemption-notice", server.source(provider), *extra]
        proc = start_launcher(train, log_path) if launcher else start_torchrun(2, train, log_path=log_path)
        try:
            # First no notice: both ranks (or at least the polling one) are asking and hear "none".
            wait_for(lambda: server.count(PROBE_PATHS[provider]) >= 4 or proc.poll() is not None, 120,
                     what="the watchers to poll")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            server.notice.set()
            status = proc.wait(150)
        except BaseException:
            kill_group(proc)
            proc.wait(10)
            raise
        assert server.notices_served, log_path.read_text()[-3000:]
        return status, run_dir, min(server.notices_served)


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("provider", ["aws", "gcp", pytest.param("azure", marks=pytest.mark.slow),
                                      pytest.param("url", marks=pytest.mark.slow)])
def test_a_notice_commits_a_checkpoint_and_training_goes_on(provider, tmp_path):
    status, run_dir, served_at = run_with_notice(provider, tmp_path)
    log = (tmp_path / "job.log").read_text()
    assert status == 0, log[-3000:]
    assert "committing a checkpoint now" in log, log[-3000:]
    committed = manifests(run_dir)
    table = [(m["step"], m.get("reason")) for m in committed]
    notices = [m for m in committed if m.get("reason") == "notice"]
    assert len(notices) <= 1, table  # latched: one notice, one save
    first, bound = steps_logged_by(run_dir, served_at), steps_logged_by(run_dir, served_at + DELIVERY_SLACK_S) + 2
    # The notice's own checkpoint, or, when it landed on an epoch's last step, that step's epoch_end
    # checkpoint (committed just before the boundary's vote; a step is never saved twice).
    [saved] = notices or [m for m in committed if m.get("reason") == "epoch_end" and first <= m["step"] <= bound]
    assert saved["step"] <= bound, table
    last = committed[-1]
    assert last["epoch"] == EPOCHS and last["step"] > saved["step"]  # training went on to the end


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_exit_on_notice_commits_and_exits_preempted(tmp_path):
    status, run_dir, served_at = run_with_notice("gcp", tmp_path, "--exit-on-notice", launcher=True)
    assert status == EXIT_PREEMPTED, (tmp_path / "job.log").read_text()[-3000:]
    log = (tmp_path / "job.log").read_text()
    assert "preemption notice" in log and "committing a checkpoint now" in log, log[-3000:]
    committed = manifests(run_dir)
    last = committed[-1]
    # A notice that lands on an epoch's last step finds that step's checkpoint already committed
    # (reason epoch_end, saved just before the boundary's vote): the job stops on it, saving nothing twice.
    assert last.get("reason") in ("notice", "epoch_end"), [(m["step"], m.get("reason")) for m in committed]
    assert last["step"] <= steps_logged_by(run_dir, served_at + DELIVERY_SLACK_S) + 2
    assert not [m for m in committed if m.get("reason") == "final"]  # it stopped there
