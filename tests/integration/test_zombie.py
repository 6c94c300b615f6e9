"""Zombie writers: a replaced attempt that is still saving can neither overwrite nor commit over the new one.

Each attempt claims the next generation number with a conditional create in `_attempts/`; its
checkpoint folders carry that number, and it checks for a newer attempt right before committing.
The test runs both: attempt 1 pauses just before the last file of its step-20 checkpoint, attempt 2
starts on the same run dir, resumes from step 10 and commits steps 20 and 30 of its own; then the
zombie is released.
"""

from __future__ import annotations

import hashlib
import threading

import pytest

from support.forkserver import shared
from support.hooked import HookedJob

JOB = ["train", "--max-steps", "30", "--checkpoint-every", "10", "--keep-last", "3", "--epochs", "1",
       "--batch-size", "32", "--log-every", "100", "--no-progress"]


def _fingerprints(storage, refs) -> dict[str, str]:
    """sha256 of every file of the given checkpoints (manifest included)."""
    out = {}
    for ref in refs:
        folder = storage.child(ref.name)
        for entry in folder.list(""):
            out[f"{ref.name}/{entry.name}"] = hashlib.sha256(folder.read(entry.name)).hexdigest()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_zombie_attempt_cannot_commit_over_newer_attempt(backend, tmp_path, request):
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.storage import Storage

    env = None
    run_dir = str(tmp_path / "run")
    if backend == "s3":
        env = request.getfixturevalue("s3_env")
        run_dir = f"s3://{request.getfixturevalue('s3_bucket')}/run"

    zombie = HookedJob([*JOB, "--run-dir", run_dir], tmp_path / "zombie", env=env,
                       pauses=["write:*ckpt-g0001-s0000000020*/trainer.safetensors"])
    try:
        zombie.wait_paused(0)
        newer = shared().run([*JOB, "--run-dir", run_dir, "--resume", "auto"], env=env)
        assert newer.rc == 0, newer.output[-3000:]
        assert "resuming from" in newer.stderr and "ckpt-g0001-s0000000010" in newer.stderr, newer.stderr
        storage = Storage(run_dir)
        newer_refs = [r for r in catalog.list_checkpoints(storage) if r.generation == 2]
        assert [r.step for r in newer_refs] == [20, 30]
        before = _fingerprints(storage, newer_refs)
        zombie.release(0)
        status = zombie.finish()
    finally:
        zombie.kill()

    assert status == 3, zombie.output  # EXIT_SUPERSEDED: fenced out, nothing committed
    assert "attempt 2 has taken over" in zombie.output, zombie.output
    verdicts = {v.ref.name: v for v in catalog.scan(storage)}
    assert sorted(verdicts) == ["ckpt-g0001-s0000000010", "ckpt-g0002-s0000000020", "ckpt-g0002-s0000000030"], \
        "the zombie committed (or left) a checkpoint after it was superseded"
    assert all(v.valid for v in verdicts.values()), {n: v.reason for n, v in verdicts.items()}
    assert _fingerprints(storage, newer_refs) == before, "the zombie changed the newer attempt's checkpoints"
    assert catalog.newest_valid(storage).ref.name == "ckpt-g0002-s0000000030"
    leftovers = [e.name for e in storage.list("") if e.name.startswith(".staging-")]
    assert not leftovers, leftovers


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_attempts_racing_for_a_generation_get_different_ones(backend, tmp_path, request):
    """Both read `latest()` before either creates: the conditional create lets only one have it."""
    from dist_train.checkpoint.fencing import AttemptRegistry
    from dist_train.checkpoint.storage import Storage

    url = str(tmp_path / "run")
    if backend == "s3":
        request.getfixturevalue("s3_env")
        url = f"s3://{request.getfixturevalue('s3_bucket')}/run"
    storage = Storage(url)
    storage.makedirs("")
    barrier = threading.Barrier(2, timeout=30)
    first_create = threading.local()

    def hook(operation: str, rel: str) -> None:
        if operation == "create" and rel.startswith("_attempts/") and not getattr(first_create, "done", False):
            first_create.done = True
            barrier.wait()  # both attempts computed the same next number

    results: list[int] = []
    errors: list[BaseException] = []

    def register(name: str) -> None:
        try:
            results.append(AttemptRegistry(storage).register(name, None))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    Storage.hooks.append(hook)
    try:
        threads = [threading.Thread(target=register, args=(f"attempt-{i}",)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        Storage.hooks.remove(hook)
    assert not errors, errors
    assert sorted(results) == [1, 2]
    registry = AttemptRegistry(storage)
    assert registry.latest() == 2
    with pytest.raises(Exception, match="attempt 2 has taken over"):
        registry.check_current(1)
