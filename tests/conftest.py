"""Shared fixtures for the heavy parts: real S3 servers on loopback, real CLI and torchrun processes.

Integration tests never mock: they start `python -m dist_train ...` and
`torchrun` subprocesses and talk to moto's `ThreadedMotoServer` (and, through the
`s3_server` fixture, also to SeaweedFS) over HTTP on 127.0.0.1. Every subprocess has
a timeout so a hang fails instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# A tiny but real job: the embedded digits data, small batches, a few epochs.
TINY = ["--epochs", "2", "--batch-size", "32", "--log-every", "5", "--no-progress"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_", "TORCHELASTIC_"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    env.update(extra or {})
    return env


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`python -m dist_train ARGS` as a real process."""
    return subprocess.run([PYTHON, "-m", "dist_train", *args], capture_output=True, text=True,
                          env=base_env(env), timeout=timeout, cwd=cwd or REPO)


def run_forked(args: list[str], env: dict[str, str] | None = None, timeout: float = 120,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`python -m dist_train ARGS` as a real process forked from the session's server, which imported
    torch once: the same CLI as `run_cli` without seconds of start-up CPU per call. Use `run_cli` where
    a fresh interpreter matters (its TMPDIR, its sys.path from the working directory)."""
    from support.forkserver import shared

    result = shared().run(args, env=env, timeout=timeout, cwd=cwd)
    status = result.rc if result.rc is not None else -(result.signal or 9)
    return subprocess.CompletedProcess(args, status, result.stdout, result.stderr)


def call_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in this process (for read-only commands where a subprocess adds only start-up time)."""
    from dist_train.cli.main import main

    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def torchrun_cmd(nproc: int, args: list[str], extra: list[str] | None = None) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            *(extra or []), "-m", "dist_train", *args]


def run_torchrun(nproc: int, args: list[str], env: dict[str, str] | None = None, timeout: float = 180,
                 extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m dist_train ARGS`, waited for."""
    return subprocess.run(torchrun_cmd(nproc, args, extra), capture_output=True, text=True, env=base_env(env),
                          timeout=timeout, cwd=REPO)


def start_torchrun(nproc: int, args: list[str], env: dict[str, str] | None = None,
                   log_path: Path | None = None, extra: list[str] | None = None) -> subprocess.Popen:
    """A torchrun job left running (for signals); its output goes to `log_path`."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(torchrun_cmd(nproc, args, extra), stdout=out, stderr=subprocess.STDOUT,
                            env=base_env(env), cwd=REPO, start_new_session=True)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alive(pid: int) -> bool:
    """Running, as opposed to exited (a zombie waits for whoever adopted it to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun puts its workers in sessions of their own)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            stack += children
    return found


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the launcher and every process under it at once (like losing the node)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def manifests(run_dir: Path) -> list[dict]:
    """Committed manifests of a local run dir, oldest first.

    Safe to poll while a job runs: retention may delete a checkpoint between the listing
    and the read, and a vanished one is simply no longer committed.
    """
    found = []
    for path in sorted(run_dir.glob("ckpt-*/manifest.json")):
        try:
            found.append(json.loads(path.read_text()))
        except FileNotFoundError:
            continue
    return found


def copy_run(run_dir: Path, parent: Path, name: str = "run") -> Path:
    """A private copy of a module-scoped run dir, for a test that damages or extends it."""
    target = parent / name
    shutil.copytree(run_dir, target)
    return target


def assert_each_epoch_exactly_once(samples: Path, epochs: int) -> None:
    """Every training index of every epoch in the sample logs of all stages and ranks, once."""
    from collections import Counter

    from dist_train.data.config import DataConfig
    from dist_train.data.registry import build_datasets

    n_train = len(build_datasets(DataConfig(), seed=0).train)
    counts: Counter = Counter()
    for path in samples.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            counts.update((record["epoch"], i) for i in record["indices"])
    for epoch in range(epochs):
        seen = {i: c for (e, i), c in counts.items() if e == epoch}
        assert set(seen) == set(range(n_train)), f"epoch {epoch}: samples skipped"
        assert set(seen.values()) == {1}, f"epoch {epoch}: samples trained twice"


def final_digest(run_dir: Path) -> str:
    return manifests(run_dir)[-1]["model_digest"]


# The files whose tests take longest (minutes of torchrun jobs), longest first: they start first, so
# the quick files fill the workers at the end instead of one long file running alone.
LONGEST_FILES = ("test_bench.py", "test_resume.py", "test_user_code.py", "test_examples.py", "test_crash_points.py",
                 "test_packed_training.py", "test_fsdp.py", "test_sharded_checkpoints.py", "test_local_cache.py",
                 "test_checkpoint_store.py")


def pytest_collection_modifyitems(config, items):
    """Longest files first (see LONGEST_FILES; the order within a file is kept). Tests marked `slow`
    repeat what faster ones show (another server, another provider's notice through a whole job): they
    run with DT_SLOW_TESTS=1, so the default suite stays within its time budget."""
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
    items.sort(key=rank)
    if os.environ.get("DT_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set DT_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """Finished tiny runs, each trained once per distinct command for the whole session.

    `trained_run(*train_flags)` returns the run dir of `dist-train train --run-dir DIR *train_flags`
    (one process, forked from the shared server that imported torch once). Tests share it:
    one that damages or extends a run works on `copy_run(...)`.
    """
    from support.forkserver import shared

    runs: dict[tuple[str, ...], Path] = {}

    def make(*flags: str) -> Path:
        if flags not in runs:
            run_dir = tmp_path_factory.mktemp("trained") / "run"
            result = shared().run(["train", "--run-dir", str(run_dir), *flags])
            assert result.rc == 0, result.output[-3000:]
            runs[flags] = run_dir
        return runs[flags]
    return make


# The run most read-only checkpoint tests share: two interval checkpoints (steps 10 and 20).
SMALL_RUN = ("--max-steps", "20", "--checkpoint-every", "10", "--epochs", "1", "--batch-size", "32",
             "--log-every", "100", "--no-progress")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's real S3 server, over HTTP on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_credentials() -> dict[str, str]:
    """Throwaway credentials made up per session (moto accepts any); never a literal in the repo."""
    return {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def seaweed_endpoint(tmp_path_factory, s3_credentials) -> Iterator[str]:
    """A real SeaweedFS S3 server (`weed mini`) on free loopback ports, for the whole session.

    Its one identity is the session's throwaway keys (SeaweedFS checks signatures, moto does not).
    """
    from support.seaweed import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"), s3_credentials["AWS_ACCESS_KEY_ID"],
                           s3_credentials["AWS_SECRET_ACCESS_KEY"]).start()
    yield server.endpoint
    server.stop()


S3_SERVERS = {"moto": "moto_endpoint", "seaweedfs": "seaweed_endpoint"}


@pytest.fixture(params=sorted(S3_SERVERS))
def s3_server(request) -> str:
    """Each real S3 implementation in turn (moto, SeaweedFS): a test that takes this fixture runs once
    per server, and `s3_env` / `s3_bucket` point at that server. Returns the server's name."""
    return request.param


@pytest.fixture
def s3_env(request, s3_credentials, monkeypatch) -> dict[str, str]:
    """Environment for S3 (moto, or each `s3_server`): for subprocesses, and set in this process too."""
    server = request.getfixturevalue("s3_server") if "s3_server" in request.fixturenames else "moto"
    env = dict(s3_credentials, AWS_ENDPOINT_URL=request.getfixturevalue(S3_SERVERS[server]))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the S3 server of `s3_env`."""
    import boto3

    name = f"dt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _fresh_fsspec_instances():
    """s3fs caches filesystem instances per process; each test gets its own connections."""
    yield
    try:
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
    except Exception:  # noqa: BLE001
        pass
