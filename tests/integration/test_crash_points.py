"""Crash consistency: a training job SIGKILLed at every step of a commit and of a retention deletion.

A reference job (steps 0-30, a checkpoint every 10 steps, keep the last 2) logs its mutating storage
operations. Then, for every operation from the first one of the step-30 commit to the end of the
job, a fresh copy of that job is SIGKILLed just before the operation (and, for local file writes,
also halfway through the write). After each kill:

- the listing never shows a staging folder, and never the partial checkpoint as valid;
- the newest valid checkpoint is step 30 exactly when the commit point (local: the folder rename,
  S3: the manifest PUT) had completed, else step 20: retention never removed the newest valid one;
- resume (`CheckpointManager.find`, what `train --resume auto` loads) picks that same checkpoint.

`ckpt prune` gets the same treatment. Finally `dist-train train --resume auto` runs on a killed run
dir: it resumes from the newest committed checkpoint and removes the leftovers.

The jobs are real, separate processes forked from `support/hooked_cli.py --serve`, which imported
torch once: a few hundred milliseconds each instead of seconds.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from support.forkserver import ForkServer, read_ops, shared

JOB = ["train", "--max-steps", "30", "--checkpoint-every", "10", "--keep-last", "2", "--epochs", "1",
       "--batch-size", "32", "--log-every", "100", "--no-progress"]
STEP30 = "s0000000030"


@pytest.fixture
def server():
    return shared()


def _commit_point(ops: list[tuple[int, str, str]]) -> int:
    """Number of the operation that makes the step-30 checkpoint exist: rename (local) or manifest PUT (S3)."""
    for number, operation, rel in ops:
        if STEP30 in rel and (operation == "rename" or (operation == "create" and rel.endswith("manifest.json"))):
            return number
    raise AssertionError(f"no commit point in {ops}")


def _kill_points(ops: list[tuple[int, str, str]], local: bool) -> list[tuple[int, bool]]:
    first = min(number for number, _, rel in ops if STEP30 in rel)
    points = []
    for number, operation, rel in ops:
        if number >= first:
            points.append((number, False))
            if local and operation == "write":
                points.append((number, True))
    return points


def _state(url: str) -> tuple[list, object]:
    """(verdicts of the listing, the payload resume loads) for a run dir, inspected in this process."""
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.checkpoint.storage import Storage

    verdicts = catalog.scan(Storage(url))
    payload = CheckpointManager(url).find()  # what `train --resume auto` would load
    return verdicts, payload


def _check(url: str, expected: int, what: str) -> None:
    verdicts, payload = _state(url)
    names = [v.ref.name for v in verdicts]
    assert all(name.startswith("ckpt-") for name in names), f"{what}: a staging folder is listed: {names}"
    valid = [v.ref.step for v in verdicts if v.valid]
    assert valid and max(valid) == expected, f"{what}: newest valid {valid}, expected step {expected}"
    for verdict in verdicts:
        if verdict.ref.step > expected:
            assert not verdict.valid and verdict.reason, f"{what}: partial {verdict.ref.name} taken as valid"
    assert payload is not None and payload.manifest["step"] == expected, f"{what}: resume took another"


def _loop(server: ForkServer, run_dir, ref_log: Path, env: dict | None) -> dict:
    """Kill a fresh job at every operation of the last commit and its retention; check each aftermath."""
    local = env is None
    reference = server.run([*JOB, "--run-dir", run_dir("reference")], env, {"DT_HOOK_LOG": str(ref_log)})
    assert reference.rc == 0, reference.output
    ops = read_ops(ref_log)
    commit = _commit_point(ops)
    assert any(op == "delete" and rel.endswith("manifest.json") for n, op, rel in ops if n > commit), \
        "the reference job should prune step 10 after committing step 30"
    dirs = {}
    for number, mid in _kill_points(ops, local):
        label = f"kill{number}{'-mid' if mid else ''}"
        hooks = {"DT_HOOK_KILL_AT": str(number), "DT_HOOK_KILL_MID": "1" if mid else "0"}
        result = server.run([*JOB, "--run-dir", run_dir(label)], env, hooks)
        assert result.signal == signal.SIGKILL, f"{label}: {result.rc} {result.output[-2000:]}"
        _, operation, rel = ops[number - 1]
        what = f"killed {'during' if mid else 'before'} op {number} ({operation} {rel})"
        _check(run_dir(label), 30 if number > commit else 20, what)
        dirs[number] = run_dir(label)
    return {"reference": run_dir("reference"), "commit": commit, **dirs}


def _prune_loop(server: ForkServer, copy, base: str, tmp_path: Path, env: dict | None) -> None:
    """`ckpt prune --keep-last 1` killed at each of its deletions: step 30 stays the newest valid."""
    log = tmp_path / "prune-ops.log"
    reference = copy(base, "prune-reference")
    result = server.run(["ckpt", "prune", reference, "--keep-last", "1"], env, {"DT_HOOK_LOG": str(log)})
    assert result.rc == 0, result.output
    ops = read_ops(log)
    assert ops and ops[0][1] == "delete" and ops[0][2].endswith("manifest.json"), ops
    for number, operation, rel in ops:
        target = copy(base, f"prune-kill{number}")
        result = server.run(["ckpt", "prune", target, "--keep-last", "1"], env, {"DT_HOOK_KILL_AT": str(number)})
        assert result.signal == signal.SIGKILL, result.output
        _check(target, 30, f"prune killed before op {number} ({operation} {rel})")


def _resume_cleans_up(server: ForkServer, killed: str, env: dict | None) -> None:
    """The next run (`dist-train train --resume auto`) resumes from step 20 and removes the leftovers."""
    result = server.run(["train", "--max-steps", "40", *JOB[3:], "--run-dir", killed, "--resume", "auto"], env)
    assert result.rc == 0, result.output[-3000:]
    assert "resuming from" in result.output and "ckpt-g0001-s0000000020" in result.output, result.output
    listing = server.run(["ckpt", "list", killed, "--json"], env)
    rows = json.loads(listing.stdout)
    assert all(row["valid"] for row in rows), rows
    assert [row["url"].rsplit("/", 1)[-1] for row in rows][-1] == "ckpt-g0002-s0000000040"
    assert not any("g0001-s0000000030" in row["url"] for row in rows), "partial folder was not cleaned up"


@pytest.mark.timeout(240)
def test_sigkill_at_every_commit_and_prune_step_local(server, tmp_path):
    import shutil

    def run_dir(label: str) -> str:
        return str(tmp_path / label)

    dirs = _loop(server, run_dir, tmp_path / "ref-ops.log", None)
    # killed just before the rename: a complete staging folder (manifest and all) must not count
    before_rename = Path(dirs[dirs["commit"]])
    staging = [p.name for p in before_rename.iterdir() if p.name.startswith(".staging-")]
    assert staging, "expected the killed commit to leave its staging folder"

    def copy(src: str, label: str) -> str:
        shutil.copytree(src, tmp_path / label)
        return str(tmp_path / label)

    _prune_loop(server, copy, dirs["reference"], tmp_path, None)
    _resume_cleans_up(server, str(before_rename), None)
    assert not [p for p in before_rename.iterdir() if p.name.startswith(".staging-")], "staging not cleaned up"


@pytest.mark.timeout(240)
def test_sigkill_at_every_commit_and_prune_step_s3(server, s3_env, s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])

    def run_dir(label: str) -> str:
        return f"s3://{s3_bucket}/{label}"

    dirs = _loop(server, run_dir, tmp_path / "ref-ops.log", s3_env)
    before_manifest = dirs[dirs["commit"]]
    prefix = before_manifest.split("/", 3)[3]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "/")["Contents"]]
    assert any(f"{STEP30}/model.safetensors" in k for k in keys), "expected orphaned data objects of step 30"

    def copy(src: str, label: str) -> str:
        source = src.split("/", 3)[3]
        listing = client.list_objects_v2(Bucket=s3_bucket, Prefix=source + "/")["Contents"]
        for obj in listing:
            client.copy_object(Bucket=s3_bucket, Key=label + obj["Key"][len(source):],
                               CopySource={"Bucket": s3_bucket, "Key": obj["Key"]})
        return f"s3://{s3_bucket}/{label}"

    _prune_loop(server, copy, dirs["reference"], tmp_path, s3_env)
    _resume_cleans_up(server, before_manifest, s3_env)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "/")["Contents"]]
    assert not any(f"g0001-{STEP30}" in k for k in keys), "orphaned objects of the killed commit remain"
