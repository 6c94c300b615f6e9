"""The user's own IterableDataset (`--dataset MODULE:ATTR` returning one): per-rank state in checkpoints.

One 2-rank job on `userpkg.iterable_data:Stream` (stateful: state_dict/load_state_dict) is held
mid-epoch after its step-4 checkpoint and SIGKILLed (the whole process group, like losing the
node). Each process of the data set logs the ids it yields (`USERPKG_YIELD_LOG`), so the test
sees where each rank's stream starts again: a 2-rank resume must continue each rank's stream
exactly after the last trained item of the checkpoint (no replay, no gap) and finish both
epochs; a 1-rank resume of the same checkpoint is refused with one line (exit 2), writing nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REPO, copy_run, kill_group, manifests, run_forked, start_torchrun, wait_for
from dist_train.errors import EXIT_BAD_INPUT

SUPPORT = REPO / "tests" / "support"
USER_PATH = {"PYTHONPATH": os.pathsep.join([str(REPO), str(SUPPORT)])}
BATCH, WORLD, POOL = 16, 2, 512
STEPS_PER_EPOCH = POOL // (BATCH * WORLD)
HOLD_AFTER = 6 * BATCH  # each rank waits while pulling its 7th batch: after the step-4 checkpoint, before step 8
FLAGS = ["--model", "userpkg.models:build", "--dataset", "userpkg.iterable_data:Stream", "--task", "regression",
         "--epochs", "2", "--batch-size", str(BATCH), "--log-every", "4", "--checkpoint-every", "4",
         "--deterministic", "--no-progress"]


def yielded(folder: Path, rank: int) -> dict[int, list[tuple[int, int]]]:
    """Per process (pid) of `rank`: the (epoch, id) pairs its stream yielded, in order."""
    out = {}
    for path in folder.glob(f"rank{rank}-*.txt"):
        pid = int(path.stem.split("-")[1])
        out[pid] = [tuple(map(int, line.split())) for line in path.read_text().splitlines()]
    return out


@pytest.mark.timeout(300)
def test_stateful_iterable_resumes_exactly_and_refuses_another_world_size(tmp_path):
    run_dir, first_log, resumed_log = tmp_path / "run", tmp_path / "first", tmp_path / "resumed"
    first_log.mkdir()
    resumed_log.mkdir()
    gate = tmp_path / "gate"
    gate.touch()
    env = {**USER_PATH, "USERPKG_YIELD_LOG": str(first_log), "USERPKG_GATE": str(gate),
           "USERPKG_GATE_AFTER": str(HOLD_AFTER)}
    proc = start_torchrun(WORLD, ["train", "--run-dir", str(run_dir), *FLAGS], env, tmp_path / "first.out")
    try:
        def held() -> bool:
            at_gate = len(list(tmp_path.glob("gate.held-*"))) == WORLD
            return proc.poll() is not None or (at_gate and any(m["step"] == 4 for m in manifests(run_dir)))
        wait_for(held, 240, interval=0.02, what="the step-4 checkpoint and both ranks at the gate")
        assert proc.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
    finally:
        kill_group(proc)
        proc.wait(30)
    saved = manifests(run_dir)[-1]
    assert saved["step"] == 4 and saved["sampler"]["iterable"] and saved["sampler"]["position"] == 4 * BATCH * WORLD

    # Another world size: one line, exit 2, the run dir untouched.
    other = copy_run(run_dir, tmp_path, "other")
    before = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    refused = run_forked(["train", "--run-dir", str(other), *FLAGS], env={**USER_PATH}, timeout=180)
    assert refused.returncode == EXIT_BAD_INPUT, (refused.returncode, refused.stderr[-2000:])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("dist-train: error:")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "2 ranks" in errors[0] and "reshardable" in errors[0], errors[0]
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == before

    # The same world size: each rank's stream continues right after its last trained item.
    proc = start_torchrun(WORLD, ["train", "--run-dir", str(run_dir), *FLAGS],
                          {**USER_PATH, "USERPKG_YIELD_LOG": str(resumed_log)}, tmp_path / "resumed.out")
    try:
        status = proc.wait(240)
    finally:
        kill_group(proc)
        proc.wait(30)
    assert status == 0, (tmp_path / "resumed.out").read_text()[-3000:]
    assert manifests(run_dir)[-1]["step"] == 2 * STEPS_PER_EPOCH
    per_rank = POOL // WORLD
    for rank in range(WORLD):
        stream = [rank + WORLD * k for k in range(per_rank)]
        (first,) = yielded(first_log, rank).values()
        assert [i for _, i in first[:HOLD_AFTER]] == stream[:HOLD_AFTER]
        (resumed,) = yielded(resumed_log, rank).values()
        trained = 4 * BATCH  # items of this rank trained by the step-4 checkpoint
        assert resumed == [(0, i) for i in stream[trained:]] + [(1, i) for i in stream], \
            f"rank {rank}: resumed stream starts at {resumed[:1]}, expected id {stream[trained]}"
