"""Crash consistency: a training job SIGKILLed at every step of a commit and of a retention deletion.

A reference job (steps 0-30, a checkpoint every 10 steps, keep the last 2) logs its mutating storage
operations. Then, for every operation from the first one of the step-30 commit to the end of the
job, a fresh copy of that job is SIGKILLed just before the operation (and, for local file writes,
also halfway through the write). After each kill:

- the listing never shows a staging folder, and never the partial checkpoint as valid;
- the newest valid checkpoint is step 30 exactly when the commit point (local: the folder rename,
  S3: the manifest PUT) had completed, else step 20: retention never removed the newest valid one;
- resume (`CheckpointManager.find`, what `train --resume auto` loads) picks that same checkpoint.

`ckpt prune` gets the same treatment. A 2-rank FSDP job whose ranks each write their share (issue 14)
gets it too: a SIGKILL of either rank before each of its operations of the commit, the sharded save's
gathers and broadcasts included. Finally `dist-train train --resume auto` runs on a killed run
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

from conftest import manifests
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


# -- two writers (issue 14): every rank writes its share, rank 0 commits the manifest ----------------
#
# A 2-rank FSDP job (`--checkpoint-writers all`, the default for fsdp), its ranks forked from the same
# server with torchrun's environment. Each rank numbers its own operations, the sharded save's
# collectives included (DT_HOOK_COLLECTIVES: the gathers and broadcasts of `ShardedSaver`). For every
# operation of either rank, from the start of the step-4 commit to the end of the job, a fresh job is
# run with that rank SIGKILLed just before it; the other rank must notice the lost peer and stop by
# itself (a launcher would also stop it). Then the same checks as above.

SHARDED_JOB = ["train", "--parallelism", "fsdp", "--max-steps", "4", "--checkpoint-every", "2", "--keep-last", "1",
               "--epochs", "1", "--batch-size", "32", "--log-every", "100", "--no-progress"]
SHARDED_STEP = "s0000000004"


def _start_ranks(server: ForkServer, argv: list[str], logs: Path, env: dict | None,
                 hooks: dict[str, str]) -> list[int]:
    """Two ranks of one job, forked from the server, with the environment torchrun gives its workers."""
    from conftest import free_port

    port = str(free_port())
    logs.mkdir(parents=True, exist_ok=True)
    return [server.start(argv, logs / f"rank{rank}.log",
                         {**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                          "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, hooks)
            for rank in range(2)]


def _run_ranks(server: ForkServer, argv: list[str], logs: Path, env: dict | None,
               hooks: dict[str, str]) -> list[tuple[int | None, int | None]]:
    return [server.wait(pid, timeout=90) for pid in _start_ranks(server, argv, logs, env, hooks)]


def _commit_ops(ops: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """This rank's operations from the start of the step-4 save (the layout gather before its first
    step-4 operation) to the end of the job."""
    first = next(i for i, (_, _, rel) in enumerate(ops) if SHARDED_STEP in rel)
    start = max(i for i in range(first) if ops[i][1] == "gather")
    return ops[start:]


def _sharded_commit_point(ops: list[tuple[int, str, str]]) -> int:
    for number, operation, rel in ops:
        if SHARDED_STEP in rel and (operation == "rename" or (operation == "create" and rel.endswith("manifest.json"))):
            return number
    raise AssertionError(f"no commit point in {ops}")


def _two_writer_outcomes(ops: dict[int, list], retention: bool = True) -> dict[tuple[int, int], set[int]]:
    """(rank, operation number) -> the steps the newest valid checkpoint may have after that kill.

    Rank 0: step 4 once its commit point (rename, or the manifest's conditional PUT) has run, else
    step 2. Rank 1: step 2 if killed before it reported its files (the gather after its writes);
    with its report received rank 0 may commit alone: killed before the decision broadcast it is a
    race whether rank 0's broadcast fails first (2 or 4); killed before the outcome broadcast rank 0
    has already decided (4). A kill before an fsync (sync_dir) leaves the same files as a kill before
    the next operation, so those points are not repeated. Without `retention`, rank 0's points end with
    the commit's last collective (the retention pass after it is the one every layout shares).
    """
    outcomes: dict[tuple[int, int], set[int]] = {}
    rank0 = _commit_ops(ops[0])
    commit = _sharded_commit_point(rank0)
    if not retention:
        rank0 = [op for op in rank0 if op[0] <= next(n for n, o, _ in rank0 if n > commit and o == "broadcast")]
    for number, operation, _ in rank0:
        if operation != "sync_dir":
            outcomes[(0, number)] = {4} if number > commit else {2}
    rank1 = _commit_ops(ops[1])
    last_write = max(i for i, (_, op, _) in enumerate(rank1) if op == "write")
    reported, decided, _ = [n for n, _, _ in rank1[last_write + 1:]]
    assert [op for _, op, _ in rank1[last_write + 1:]] == ["gather", "broadcast", "broadcast"], rank1
    for number, operation, _ in rank1:
        if operation != "sync_dir":
            outcomes[(1, number)] = {2} if number <= reported else {2, 4} if number == decided else {4}
    return outcomes


def _check_two_writers(url: str, allowed: set[int], what: str, env: dict | None) -> int:
    verdicts, payload = _state(url)
    names = [v.ref.name for v in verdicts]
    assert all(name.startswith("ckpt-") for name in names), f"{what}: a staging folder is listed: {names}"
    valid = [v.ref.step for v in verdicts if v.valid]
    assert valid and max(valid) in allowed, f"{what}: newest valid {valid}, expected one of {sorted(allowed)}"
    newest = max(valid)
    for verdict in verdicts:
        if verdict.ref.step > newest:
            assert not verdict.valid and verdict.reason, f"{what}: partial {verdict.ref.name} taken as valid"
    assert payload is not None and payload.manifest["step"] == newest, f"{what}: resume took another"
    if newest == 4:  # the 2-writer checkpoint: one manifest lists (and the check verified) both ranks' shards
        assert {"shards/rank00000/model.safetensors", "shards/rank00001/model.safetensors"} <= \
            set(payload.manifest["files"]), what
    return newest


def _two_writer_loop(server: ForkServer, run_dir, tmp_path: Path, env: dict | None, retention: bool = True) -> dict:
    reference_log = tmp_path / "ref-ops.log"
    results = _run_ranks(server, [*SHARDED_JOB, "--run-dir", run_dir("reference")], tmp_path / "reference-logs",
                         env, {"DT_HOOK_LOG": str(reference_log), "DT_HOOK_COLLECTIVES": "1"})
    assert results == [(0, None), (0, None)], (tmp_path / "reference-logs" / "rank0.log").read_text()[-3000:]
    ops = {rank: read_ops(Path(f"{reference_log}.rank{rank}")) for rank in range(2)}
    assert any(op == "delete" and rel.endswith("manifest.json") for _, op, rel in _commit_ops(ops[0])), \
        "the reference job should prune step 2 after committing step 4"
    dirs = {}
    for (rank, number), allowed in _two_writer_outcomes(ops, retention).items():
        label = f"rank{rank}-kill{number}"
        results = _run_ranks(server, [*SHARDED_JOB, "--run-dir", run_dir(label)], tmp_path / f"{label}-logs", env,
                             {"DT_HOOK_KILL_AT": str(number), "DT_HOOK_RANK": str(rank), "DT_HOOK_COLLECTIVES": "1"})
        _, operation, rel = ops[rank][number - 1]
        what = f"rank {rank} killed before its op {number} ({operation} {rel})"
        assert results[rank] == (None, signal.SIGKILL), f"{what}: {results}"
        survivor = results[1 - rank]
        assert survivor[1] is None and survivor[0] != 0, f"{what}: the other rank did not stop by itself: {results}"
        _check_two_writers(run_dir(label), allowed, what, env)
        dirs[(rank, number)] = run_dir(label)
    return {"ops": ops, "commit": _sharded_commit_point(_commit_ops(ops[0])), **dirs}


def _two_writer_resume(server: ForkServer, killed: str, tmp_path: Path, env: dict | None) -> None:
    """The next attempt resumes from step 2 and removes the killed commit's files."""
    results = _run_ranks(server, [*SHARDED_JOB, "--max-steps", "6", "--run-dir", killed], tmp_path / "resume-logs",
                         env, {})
    output = (tmp_path / "resume-logs" / "rank0.log").read_text()
    assert results == [(0, None), (0, None)], output[-3000:]
    assert "resuming from" in output and "ckpt-g0001-s0000000002" in output, output[-3000:]


@pytest.mark.timeout(300)
def test_sigkill_before_every_operation_of_a_two_writer_commit_local(server, tmp_path):
    def run_dir(label: str) -> str:
        return str(tmp_path / label)

    dirs = _two_writer_loop(server, run_dir, tmp_path, None)
    # Killed just before the rename, rank 0 leaves a complete staging folder (both ranks' shards and the
    # manifest): not a checkpoint. The next attempt resumes from step 2 and removes it.
    killed = Path(dirs[(0, dirs["commit"])])
    staging = [p for p in killed.iterdir() if p.name.startswith(".staging-")]
    assert len(staging) == 1 and (staging[0] / "manifest.json").exists(), staging
    assert {p.parent.name for p in staging[0].glob("shards/*/*.safetensors")} == {"rank00000", "rank00001"}
    _two_writer_resume(server, str(killed), tmp_path, None)
    assert not [p for p in killed.iterdir() if p.name.startswith(".staging-")], "staging not cleaned up"
    assert manifests(killed)[-1]["step"] == 6


@pytest.mark.slow  # the local 2-writer test kills before every operation; the 1-writer S3 test covers S3
@pytest.mark.timeout(300)
def test_sigkill_before_every_operation_of_a_two_writer_commit_s3(server, s3_env, s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])

    def run_dir(label: str) -> str:
        return f"s3://{s3_bucket}/{label}"

    def keys(label: str) -> list[str]:
        listing = client.list_objects_v2(Bucket=s3_bucket, Prefix=label + "/").get("Contents", [])
        return [obj["Key"] for obj in listing]

    # The retention pass after the commit is the same code for every layout: killed at each of its
    # deletions in the single-writer S3 test above and in the local 2-writer test.
    dirs = _two_writer_loop(server, run_dir, tmp_path, s3_env, retention=False)
    # Killed just before the manifest PUT: both ranks' shards are there, orphaned; the next attempt
    # resumes from step 2 and removes them.
    label = f"rank0-kill{dirs['commit']}"
    orphans = [k for k in keys(label) if f"g0001-{SHARDED_STEP}" in k]
    assert any("shards/rank00000/" in k for k in orphans) and any("shards/rank00001/" in k for k in orphans), orphans
    assert not any(k.endswith("manifest.json") for k in orphans), orphans
    _two_writer_resume(server, run_dir(label), tmp_path, s3_env)
    assert not any(f"g0001-{SHARDED_STEP}" in k for k in keys(label)), "orphaned objects of the killed commit remain"


# -- issue 20, item 5: a peer that dies during rank 0's commit -------------------------------------
#
# Rank 0 has every rank's report and has decided to commit; rank 1 waits for its word and is SIGKILLed
# before the commit point (rank 0 is held just before its rename), so rank 0 commits with a dead peer and
# its final broadcast fails. The manifest is written whatever happens next: rank 0 must log the commit,
# not a failed checkpoint (a failure would count towards --max-consecutive-failures and hide a valid
# checkpoint from the log a user reads).

@pytest.mark.timeout(240)
def test_rank0_keeps_a_commit_whose_peer_dies_right_after_it(server, tmp_path, capsys):
    import os

    from conftest import alive, call_cli, wait_for

    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    hooks = {"DT_HOOK_PAUSE": f"rename:ckpt-*-{SHARDED_STEP}", "DT_HOOK_PAUSED": str(tmp_path / "paused"),
             "DT_HOOK_RELEASE": str(tmp_path / "release"), "DT_HOOK_RANK": "0"}
    rank0, rank1 = _start_ranks(server, [*SHARDED_JOB, "--run-dir", str(run_dir)], logs, None, hooks)
    try:
        wait_for(lambda: (tmp_path / "paused.0").exists() or not alive(rank0), 150, 0.02, "rank 0 at its commit")
        log0 = logs / "rank0.log"
        assert (tmp_path / "paused.0").exists(), log0.read_text()[-3000:]
        os.kill(rank1, signal.SIGKILL)
        assert server.wait(rank1, 30) == (None, signal.SIGKILL)
        (tmp_path / "release.0").touch()
        code, _ = server.wait(rank0, 90)
    finally:
        for pid in (rank0, rank1):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    output = log0.read_text()
    assert code != 0, output[-3000:]  # the job itself cannot go on without its peer
    committed = run_dir / f"ckpt-g0001-{SHARDED_STEP}"
    assert f"committed {committed} (step 4" in output, output[-3000:]
    assert "could not tell every rank" in output, output[-3000:]
    assert "checkpoint at step 4 failed" not in output, output[-3000:]
    # It is a checkpoint like any other: it verifies, and the next attempt resumes from it.
    assert _check_two_writers(str(run_dir), {4}, "peer killed during the commit", None) == 4
    code, out, _ = call_cli(["ckpt", "verify", str(committed)], capsys)
    assert code == 0, out
    results = _run_ranks(server, [*SHARDED_JOB, "--max-steps", "6", "--run-dir", str(run_dir)], tmp_path / "resume",
                         None, {})
    resumed = (tmp_path / "resume" / "rank0.log").read_text()
    assert results == [(0, None), (0, None)], resumed[-3000:]
    assert "resuming from" in resumed and committed.name in resumed, resumed[-3000:]
    assert manifests(run_dir)[-1]["step"] == 6
