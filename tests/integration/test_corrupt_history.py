"""A checkpoint found corrupt at resume is not history: retention deletes it first, `ckpt` says why.

Real single-process training runs (forked from the session's server): two checkpoints, the
newest one's bytes damaged (its manifest and sizes still look right, so only reading it tells),
then resumes. Without the mark, `--keep-last 2` kept the corrupt checkpoint and evicted the
valid one the run had just resumed from.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import call_cli, copy_run, run_forked

FLAGS = ["--epochs", "1", "--batch-size", "32", "--log-every", "100", "--no-progress", "--checkpoint-every", "2"]
OLD_VALID, CORRUPT = "ckpt-g0001-s0000000002", "ckpt-g0001-s0000000004"


def damage(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the tensor bytes: the header, manifest and size stay right
    path.write_bytes(bytes(raw))


@pytest.mark.timeout(240)
def test_a_corrupt_checkpoint_found_at_resume_is_evicted_first_and_listed_invalid(tmp_path, capsys):
    run_a = tmp_path / "run"
    first = run_forked(["train", "--run-dir", str(run_a), "--max-steps", "4", *FLAGS])
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in run_a.glob("ckpt-*")) == [OLD_VALID, CORRUPT]
    damage(run_a / CORRUPT / "model.safetensors")
    code, out, _ = call_cli(["ckpt", "list", str(run_a), "--verify", "size"], capsys)
    assert code == 0 and "NO" not in out  # the listing alone cannot tell: only the bytes do
    run_b = copy_run(run_a, tmp_path / "b")

    # Resume with --keep-last 2, two more commits: the corrupt one goes first, then the old valid one.
    second = run_forked(["train", "--run-dir", str(run_a), "--max-steps", "6", "--keep-last", "2", *FLAGS])
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert f"resuming from {run_a / OLD_VALID}" in log
    deleted = re.findall(r"retention: deleted \S+/(ckpt-\S+)", log)
    assert deleted == [CORRUPT, OLD_VALID], log[-3000:]
    assert sorted(p.name for p in run_a.glob("ckpt-*")) == ["ckpt-g0002-s0000000004", "ckpt-g0002-s0000000006"]

    # Without retention, the mark stays: `ckpt list` (even a size-only listing) and `latest` know it, `prune`
    # removes it first.
    third = run_forked(["train", "--run-dir", str(run_b), "--max-steps", "6", *FLAGS])
    assert third.returncode == 0, third.stderr[-3000:]
    code, out, _ = call_cli(["ckpt", "list", str(run_b), "--json", "--verify", "size"], capsys)
    rows = {row["url"].rsplit("/", 1)[-1]: row for row in json.loads(out)}
    assert not rows[CORRUPT]["valid"]
    assert rows[CORRUPT]["reason"] == ("found corrupt when read: file model.safetensors does not match its "
                                       "sha256 (corrupted)")
    assert all(row["valid"] for name, row in rows.items() if name != CORRUPT) and len(rows) == 4
    code, out, _ = call_cli(["ckpt", "prune", str(run_b), "--keep-last", "2"], capsys)
    assert code == 0
    assert re.findall(r"deleted \S+/(ckpt-\S+)", out) == [CORRUPT, OLD_VALID]
    assert sorted(p.name for p in run_b.glob("ckpt-*")) == ["ckpt-g0002-s0000000004", "ckpt-g0002-s0000000006"]
    assert not any((run_b / "_invalid").iterdir())  # the mark goes with its checkpoint
