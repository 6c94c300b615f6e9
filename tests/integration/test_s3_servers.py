"""S3 against two real implementations (moto and SeaweedFS), and against a server that ignores
conditional writes (moto behind a loopback proxy that strips `If-None-Match`).

- commit, list, verify, ranged reads and retention on each server; SeaweedFS keeps listing a
  folder for a while after its last object is deleted, which must not read as a broken checkpoint;
- a run preempted by SIGTERM resumes from its S3 run dir on each server;
- a server that accepts a second `If-None-Match: *` create is detected once per run: one warning
  and check-then-write, or, with `--strict-fencing`, exit 2 with one line and nothing written.
"""

from __future__ import annotations

import json
import os
import signal

import boto3
import pytest

from conftest import TINY, call_cli
from dist_train.checkpoint import catalog
from dist_train.checkpoint.retention import delete_checkpoint
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter, clean_stale
from dist_train.errors import EXIT_PREEMPTED
from support.fault_proxy import FaultProxy
from support.forkserver import shared
from support.hooked import HookedJob

FIELDS = {"epoch": 0, "world_size": 1, "model_digest": "0" * 64}


def _keys(env: dict[str, str], bucket: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


@pytest.mark.timeout(60)
def test_commit_list_verify_read_and_retention_on_each_server(s3_server, s3_env, s3_bucket, capsys):
    url = f"s3://{s3_bucket}/run"
    storage = Storage(url)
    storage.check_conditional_writes(strict=True)  # both honour If-None-Match; the probe leaves nothing
    writer = CheckpointWriter(storage, 1, "writer-a", None)
    old = writer.commit(5, {"model.safetensors": b"old" * 1000, "extra/notes.bin": b"n" * 10}, FIELDS)
    new = writer.commit(10, {"model.safetensors": bytes(range(256)) * 64, "extra/notes.bin": b"n" * 10}, FIELDS)

    rows = json.loads(call_cli(["ckpt", "list", url, "--json"], capsys)[1])
    assert [(r["step"], r["valid"]) for r in rows] == [(5, True), (10, True)], rows
    code, out, err = call_cli(["ckpt", "verify", url], capsys)
    assert code == 0, out + err
    assert call_cli(["ckpt", "latest", url], capsys)[1].strip() == new.url
    data = storage.read(f"{new.name}/model.safetensors")
    assert storage.read_range(f"{new.name}/model.safetensors", 300, 9000) == data[300:9000]

    # retention removes the superseded checkpoint; SeaweedFS goes on listing the emptied folder (one
    # with a sub-folder) for minutes, which must read as no checkpoint at all, not as a broken one
    delete_checkpoint(storage, catalog.parse_name(old.name))
    assert not _keys(s3_env, s3_bucket, f"run/{old.name}/")
    code, out, err = call_cli(["ckpt", "verify", url], capsys)
    assert code == 0, out + err
    assert [r["step"] for r in json.loads(call_cli(["ckpt", "list", url, "--json"], capsys)[1])] == [10]
    assert [r.step for r in catalog.list_checkpoints(storage)] == [10]
    assert clean_stale(storage, 2) == []
    assert catalog.newest_valid(storage).ref.name == new.name
    assert not [k for k in _keys(s3_env, s3_bucket, "run/") if ".probe-" in k]


@pytest.mark.timeout(120)
def test_a_run_preempted_by_sigterm_resumes_from_s3_on_each_server(s3_server, s3_env, s3_bucket, tmp_path):
    """SIGTERM arrives while the step-10 manifest is being committed (the job paused there): the job
    finishes that commit, commits a `preempted` checkpoint at the next step and exits 75; the same
    command then resumes from it. Forked from the shared fork server (torch imported once)."""
    url = f"s3://{s3_bucket}/run"
    args = ["train", "--run-dir", url, *TINY, "--max-steps", "30", "--checkpoint-every", "10", "--keep-last", "2"]
    job = HookedJob(args, tmp_path / "first", pauses=["create:ckpt-g0001-s0000000010/manifest.json"], env=s3_env)
    try:
        job.wait_paused(0)
        os.kill(job.pid, signal.SIGTERM)
        job.release(0)
        code = job.finish()
    finally:
        job.kill()
    assert code == EXIT_PREEMPTED, job.output[-3000:]
    storage = Storage(url)
    preempted = catalog.newest_valid(storage)
    assert preempted is not None and preempted.manifest["reason"] == "preempted", job.output[-3000:]
    assert preempted.ref.step > 10

    result = shared().run(args, env=s3_env, timeout=90)
    assert result.rc == 0, result.output[-3000:]
    assert "resuming from" in result.stderr and preempted.ref.name in result.stderr, result.output[-3000:]
    verdicts = catalog.scan(storage)
    assert [v.ref.name for v in verdicts] == ["ckpt-g0002-s0000000020", "ckpt-g0002-s0000000030"], verdicts
    assert all(v.valid for v in verdicts), [(v.ref.name, v.reason) for v in verdicts]


@pytest.fixture
def ignoring_server(moto_endpoint, s3_env, s3_bucket):
    """moto behind a proxy that drops `If-None-Match`: a server that ignores conditional writes."""
    with FaultProxy(moto_endpoint) as proxy:
        proxy.strip_headers = {"if-none-match"}
        yield dict(s3_env, AWS_ENDPOINT_URL=proxy.url)


@pytest.mark.timeout(90)
def test_a_server_ignoring_conditional_writes_gets_one_warning_and_check_then_write(
        ignoring_server, s3_env, s3_bucket, monkeypatch, capsys):
    url = f"s3://{s3_bucket}/run"
    monkeypatch.setenv("AWS_ENDPOINT_URL", ignoring_server["AWS_ENDPOINT_URL"])
    naive = Storage(f"s3://{s3_bucket}/naive")
    assert naive.create_exclusive("x", b"first") and naive.create_exclusive("x", b"second"), \
        "the proxy should make the server accept a second create"
    checked = Storage(f"s3://{s3_bucket}/checked")
    checked.check_conditional_writes()
    assert checked.create_exclusive("x", b"first") and not checked.create_exclusive("x", b"second")
    assert checked.read("x") == b"first"

    result = shared().run(["train", "--run-dir", url, *TINY, "--max-steps", "6", "--checkpoint-every", "3"],
                          env=ignoring_server)
    assert result.rc == 0, result.output[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "conditional writes" in line]
    assert len(warnings) == 1 and "best-effort" in warnings[0], result.stderr[-3000:]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])  # read back straight from moto
    code, out, err = call_cli(["ckpt", "verify", url], capsys)
    assert code == 0 and out.count("ckpt-g0001-") == 2, out + err
    keys = _keys(s3_env, s3_bucket, "run/_attempts/")
    assert keys == ["run/_attempts/000001.json"], keys  # the probe is gone


@pytest.mark.timeout(60)
def test_strict_fencing_refuses_such_a_server_with_one_line_and_writes_nothing(ignoring_server, s3_env,
                                                                               s3_bucket):
    result = shared().run(["train", "--run-dir", f"s3://{s3_bucket}/run", *TINY, "--max-steps", "6",
                           "--strict-fencing"], env=ignoring_server)
    assert result.rc == 2, result.output[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ignores conditional writes" in lines[0] and "--strict-fencing" in lines[0], lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _keys(s3_env, s3_bucket, "") == [], "nothing may be written (the probe removed)"
