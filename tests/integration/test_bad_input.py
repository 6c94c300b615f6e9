"""The bad-input catalog (docs/bad-input.md): every row exits 2 with one line, no traceback, and writes nothing.

Each row runs the real CLI in its own process (forked from `support/hooked_cli.py --serve`, which
imported torch once; `test_forked_cli_matches_a_fresh_interpreter` checks that a fresh
`python -m dist_train` prints exactly the same). "Writes nothing": the run dir does not exist
afterwards, the S3 bucket stays empty, and a run dir that existed before is unchanged.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, SMALL_RUN, base_env, free_port, run_cli
from support.forkserver import shared

TRAIN = ["train", "--max-steps", "1", "--no-progress"]


@dataclass
class Ctx:
    """What a row may refer to; `run` is the run dir a row may not create."""
    tmp: Path
    run: str
    env: dict[str, str] | None = None
    bucket: str | None = None
    trained: Path | None = None


@dataclass
class Row:
    id: str
    argv: Callable[[Ctx], list[str]]
    expect: str
    needs: str = ""  # "", "s3", "auth", "trained"
    files: dict[str, str] = field(default_factory=dict)
    env: Callable[[Ctx], dict[str, str]] | None = None


def _train(*args: str) -> Callable[[Ctx], list[str]]:
    return lambda c: [*TRAIN, "--run-dir", c.run, *[a.format(tmp=c.tmp, trained=c.trained) for a in args]]


CKPT = "{trained}/ckpt-g0001-s0000000010"
ROWS = [
    # flags and values
    Row("unknown-flag", _train("--bogus-flag"), "unrecognized arguments: --bogus-flag"),
    Row("negative-lr", _train("--lr", "-1"), "invalid lr (--lr): must be > 0"),
    Row("zero-batch-size", _train("--batch-size", "0"), "invalid batch_size (--batch-size): must be > 0"),
    Row("non-numeric-epochs", _train("--epochs", "two"), "invalid epochs (--epochs): must be a whole number"),
    Row("unknown-model", _train("--model", "resnet1000"), "invalid model (--model): must be one of"),
    Row("unknown-dataset", _train("--dataset", "imagenet22k"), "invalid dataset (--dataset): must be one of"),
    Row("unknown-optimizer", _train("--optimizer", "adamw9"), "invalid optimizer (--optimizer): must be one of"),
    Row("zero-keep-last", _train("--keep-last", "0"), "invalid keep_last (--keep-last): must be > 0"),
    Row("bad-resume-value", _train("--resume", "sometimes"), "must be auto, never, or a checkpoint URL"),
    Row("missing-data-root", _train("--dataset", "mnist"), "data set mnist needs --data-root"),
    Row("data-root-not-found", _train("--dataset", "mnist", "--data-root", "{tmp}/no-data"), "data root not found"),
    Row("freeze-backbone-on-cnn", _train("--freeze-backbone"), "--freeze-backbone needs a torchvision backbone"),
    Row("pretrained-weights-missing", _train("--model", "resnet18", "--pretrained-weights", "{tmp}/none.pt"),
        "pretrained weights not found"),
    Row("cuda-not-available", _train("--device", "cuda"), "CUDA is not available"),
    # config files
    Row("missing-config-file", _train("--config", "{tmp}/nope.yaml"), "config file not found"),
    Row("malformed-yaml", _train("--config", "{tmp}/bad.yaml"), "is not valid YAML (line",
        files={"bad.yaml": "epochs: 1\nlr: [0.1\n"}),
    Row("unknown-yaml-key", _train("--config", "{tmp}/bad.yaml"), "unknown key 'learning_rate' in config file",
        files={"bad.yaml": "learning_rate: 0.1\n"}),
    Row("bad-yaml-value", _train("--config", "{tmp}/bad.yaml"), "invalid batch_size (--batch-size): must be > 0",
        files={"bad.yaml": "data:\n  batch_size: -3\n"}),
    Row("yaml-not-a-mapping", _train("--config", "{tmp}/bad.yaml"), "must hold a mapping",
        files={"bad.yaml": "- epochs\n- 1\n"}),
    # run dir URLs and storage
    Row("unknown-url-scheme", lambda c: [*TRAIN, "--run-dir", "foo://x/run"], "unknown URL scheme 'foo://'"),
    Row("storage-options-not-json", lambda c: [*TRAIN, "--run-dir", c.run, "--storage-options", '{"anon": '],
        "invalid storage_options (--storage-options): must be a JSON object"),
    Row("storage-options-unknown-key", lambda c: [*TRAIN, "--run-dir", c.run, "--storage-options", '{"colour": 1}'],
        "storage options do not fit", needs="s3"),
    Row("missing-bucket", lambda c: [*TRAIN, "--run-dir", f"s3://no-such-{c.bucket}/run"],
        "bucket or container does not exist", needs="s3"),
    Row("unreachable-endpoint", lambda c: [*TRAIN, "--run-dir", c.run], "storage not reachable", needs="s3",
        env=lambda c: {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}),
    Row("unknown-access-key", lambda c: [*TRAIN, "--run-dir", c.run], "access denied (check the credentials)",
        needs="auth", env=lambda c: {"AWS_ACCESS_KEY_ID": "AKIA" + "0" * 16}),
    Row("wrong-secret-key", lambda c: [*TRAIN, "--run-dir", c.run], "access denied (check the credentials)",
        needs="auth", env=lambda c: {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
    # resume
    Row("resume-folder-without-checkpoints", _train("--resume", "{tmp}/empty"), "no checkpoint there"),
    Row("resume-path-missing", _train("--resume", "{tmp}/no-such-checkpoint"), "no checkpoint there"),
    Row("checkpoint-of-another-model", _train("--resume", CKPT, "--model", "mlp"),
        "checkpoint holds a cnn model", needs="trained"),
    Row("checkpoint-with-other-classes", _train("--resume", CKPT, "--dataset", "synthetic", "--synthetic-shape",
                                                "1,8,8", "--synthetic-classes", "3"),
        "checkpoint holds a cnn model with 10 classes", needs="trained"),
    Row("resume-never-beside-checkpoints", lambda c: [*TRAIN, "--run-dir", str(c.trained), "--resume", "never"],
        "--resume never would start over beside them", needs="trained"),
    # checkpoint commands
    Row("prune-keep-last-zero", lambda c: ["ckpt", "prune", str(c.trained), "--keep-last", "0"],
        "--keep-last must be >= 1", needs="trained"),
    Row("list-missing-run-dir", lambda c: ["ckpt", "list", c.run], "run dir not found"),
    Row("ckpt-storage-options-not-json", lambda c: ["ckpt", "list", str(c.trained), "--storage-options", "[1]"],
        "--storage-options must be a JSON object", needs="trained"),
]


def _closed_port() -> int:
    return free_port()  # bound, then released: nothing listens there


def _snapshot(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*")) if path.exists() else []


@pytest.fixture
def trained(trained_run) -> Path:
    return trained_run(*SMALL_RUN)


@pytest.fixture(scope="module")
def auth_moto(tmp_path_factory):
    """A separate moto server that checks credentials (moto accepts any unless told otherwise)."""
    import boto3

    port = free_port()
    env = base_env({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("could not start an authenticating moto server")
                time.sleep(0.1)
        bootstrap = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "AKIABOOTSTRAP",
                     "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **bootstrap)  # the first 4 requests need no credentials
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket="auth-bucket")
        yield creds, client
    finally:
        proc.terminate()
        proc.wait(10)


def _context(row: Row, tmp_path: Path, request) -> tuple[Ctx, Callable[[], list]]:
    """The row's context and a function listing what exists where it must not write."""
    (tmp_path / "empty").mkdir()
    for name, text in row.files.items():
        (tmp_path / name).write_text(text)
    ctx = Ctx(tmp_path, str(tmp_path / "run"))
    if row.needs == "trained":
        ctx.trained = request.getfixturevalue("trained")
    if row.needs == "s3":
        ctx.env = request.getfixturevalue("s3_env")
        ctx.bucket = request.getfixturevalue("s3_bucket")
        ctx.run = f"s3://{ctx.bucket}/run"
        import boto3

        client = boto3.client("s3", endpoint_url=ctx.env["AWS_ENDPOINT_URL"])
        return ctx, lambda: client.list_objects_v2(Bucket=ctx.bucket).get("Contents", [])
    if row.needs == "auth":
        creds, client = request.getfixturevalue("auth_moto")
        ctx.env, ctx.bucket, ctx.run = dict(creds), "auth-bucket", "s3://auth-bucket/run"
        return ctx, lambda: client.list_objects_v2(Bucket="auth-bucket").get("Contents", [])
    return ctx, lambda: _snapshot(Path(ctx.run)) + _snapshot(ctx.trained or tmp_path / "none")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(row, tmp_path, request):
    if row.id == "cuda-not-available":
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    ctx, written = _context(row, tmp_path, request)
    before = written()
    env = dict(ctx.env or {}, **(row.env(ctx) if row.env else {}))
    result = shared().run(row.argv(ctx), env=env, timeout=60)
    lines = result.stderr.splitlines()
    assert result.rc == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("dist-train: error: "), result.stderr
    assert row.expect in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert written() == before, "a refused command wrote or deleted something"


@pytest.mark.timeout(120)
def test_forked_cli_matches_a_fresh_interpreter(tmp_path):
    """The fork server prints what `python -m dist_train` prints (nothing extra at import time)."""
    argv = _train("--lr", "-1")(Ctx(tmp_path, str(tmp_path / "run")))
    fresh = run_cli(argv)
    forked = shared().run(argv)
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (forked.rc, forked.stdout, forked.stderr)


def test_catalog_document_lists_every_row():
    doc = (REPO / "docs" / "bad-input.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M))
    assert documented == {row.id for row in ROWS}, documented ^ {row.id for row in ROWS}
