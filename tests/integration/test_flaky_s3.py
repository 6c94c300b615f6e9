"""A flaky object store: throttling, 5xx, resets and timeouts are retried within a bounded budget.

The faults come from `support/fault_proxy.py`, a loopback proxy in front of the moto server.
"""

from __future__ import annotations

import errno
import json
import logging
import time

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from conftest import TINY, run_torchrun
from support.fault_proxy import FaultProxy
from support.forkserver import shared


@pytest.fixture
def proxy(moto_endpoint):
    with FaultProxy(moto_endpoint, seed=1234) as running:
        yield running


def _client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} happened"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def test_classification_of_storage_errors():
    """What is retried (throttling, 5xx, resets, timeouts) and what is an answer (4xx, 412, local disk)."""
    from s3fs.errors import translate_boto_error

    from dist_train.checkpoint.faults import describe_error, is_transient

    transient = [_client_error("SlowDown", 503), _client_error("InternalError", 500),
                 _client_error("ServiceUnavailable", 503), _client_error("ConditionalRequestConflict", 409),
                 translate_boto_error(_client_error("SlowDown", 503)), ConnectionResetError(errno.ECONNRESET, "reset"),
                 EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
                 ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), TimeoutError()]
    final = [_client_error("AccessDenied", 403), _client_error("NoSuchBucket", 404),
             _client_error("PreconditionFailed", 412), translate_boto_error(_client_error("AccessDenied", 403)),
             FileExistsError("exists"), OSError(errno.ENOSPC, "No space left on device"),
             PermissionError(errno.EACCES, "Permission denied", "/x"), ValueError("bad")]
    for exc in transient:
        assert is_transient(exc), exc
    for exc in final:
        assert not is_transient(exc), exc
    assert describe_error(translate_boto_error(_client_error("SlowDown", 503))) == "SlowDown: SlowDown happened"
    assert describe_error(OSError(errno.ENOSPC, "No space left on device", "/run/.staging-x")) == \
        "No space left on device (/run/.staging-x)"


@pytest.mark.timeout(120)
def test_retry_budget_is_bounded_and_ends_in_one_clear_line(proxy, s3_env, s3_bucket, monkeypatch):
    """Always throttled: exactly attempts x botocore attempts requests, then one line naming the cause."""
    from dist_train.checkpoint.faults import RetryPolicy, describe_error
    from dist_train.checkpoint.storage import Storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    options = {"config_kwargs": {"retries": {"total_max_attempts": 2, "mode": "standard"}}}
    storage = Storage(f"s3://{s3_bucket}/run", options, retry=RetryPolicy(attempts=3, base_delay=0.01,
                                                                         max_delay=0.02))
    proxy.configure(slowdown=1.0)
    with pytest.raises(OSError) as caught:
        storage.write_bytes("a.bin", b"x" * 100)
    assert proxy.counts["requests"] == 3 * 2, proxy.counts  # s3fs's own retry loop must not multiply this
    assert describe_error(caught.value) == "SlowDown: Please reduce your request rate. (gave up after 3 tries)"

    proxy.configure(slowdown=0.0, reset_before=1.0)
    before = proxy.counts["requests"]
    with pytest.raises(Exception) as caught:
        storage.read("a.bin")
    assert 3 * 2 <= proxy.counts["requests"] - before <= 3 * 2 * 2, proxy.counts  # aiohttp may resend once
    message = describe_error(caught.value)
    assert "\n" not in message and message.endswith("(gave up after 3 tries)"), message

    # a deadline ends the retries even when many attempts are allowed
    patient = Storage(f"s3://{s3_bucket}/run", options, retry=RetryPolicy(attempts=1000, base_delay=0.2,
                                                                          max_delay=0.2, deadline=1.0))
    started = time.monotonic()
    with pytest.raises(Exception):
        patient.list("")
    assert time.monotonic() - started < 30


@pytest.mark.timeout(120)
def test_throttling_resets_and_timeouts_are_survived(proxy, s3_env, s3_bucket, monkeypatch):
    """30% of requests fail or stall past the read timeout; every operation still succeeds."""
    from dist_train.checkpoint.storage import Storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.configure(slowdown=0.1, internal=0.05, reset_before=0.05, reset_after=0.05, stall=0.05)
    proxy.stall_seconds = 1.0
    storage = Storage(f"s3://{s3_bucket}/run", {"config_kwargs": {"read_timeout": 0.3}})
    for i in range(12):
        storage.write_bytes(f"obj-{i}", bytes([i]) * 1000)
        assert storage.read(f"obj-{i}") == bytes([i]) * 1000
    assert len(storage.list("")) == 12
    assert all(proxy.counts[f] for f in ("slowdown", "internal", "reset_before", "reset_after", "stall")), \
        proxy.counts


@pytest.mark.timeout(120)
def test_lost_response_of_conditional_manifest_create(proxy, s3_env, s3_bucket, monkeypatch, caplog):
    """The manifest PUT reaches the store but its answer is lost: the retry finds our own manifest."""
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.fencing import AttemptRegistry
    from dist_train.checkpoint.storage import Storage
    from dist_train.checkpoint.writer import CheckpointWriter, CommitConflict

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    storage = Storage(f"s3://{s3_bucket}/run")
    fields = {"epoch": 0, "world_size": 1, "model_digest": "0" * 64}

    proxy.drop_conditional_puts, proxy.drop_path_contains = 1, "/_attempts/"
    generation = AttemptRegistry(storage).register("writer-a", None)
    assert proxy.counts["drop_response"] == 1
    assert AttemptRegistry(storage).latest() == generation  # unique even though the first answer was lost

    proxy.drop_conditional_puts, proxy.drop_path_contains = 1, "manifest.json"
    writer = CheckpointWriter(storage, generation, "writer-a", AttemptRegistry(storage))
    with caplog.at_level(logging.INFO, logger="dist_train"):
        committed = writer.commit(10, {"model.safetensors": b"weights" * 100}, fields)
    assert proxy.counts["drop_response"] == 2, proxy.counts
    assert "retried after it had succeeded" in caplog.text
    verdict = catalog.inspect(storage, catalog.parse_name(committed.name))
    assert verdict.valid and verdict.manifest["writer_id"] == "writer-a", verdict.reason

    direct = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    stored = json.loads(direct.get_object(Bucket=s3_bucket, Key=f"run/{committed.name}/manifest.json")["Body"].read())
    assert stored["writer_id"] == "writer-a"

    # a different writer at the same name never replaces it
    other = CheckpointWriter(storage, generation, "writer-b", None)
    with pytest.raises(CommitConflict):
        other.commit(10, {"model.safetensors": b"other" * 100}, fields)
    assert catalog.inspect(storage, catalog.parse_name(committed.name)).valid


@pytest.mark.timeout(300)
def test_two_rank_training_survives_flaky_s3(proxy, s3_env, s3_bucket):
    """Acceptance: 10% 503 SlowDown and 5% resets; a 2-rank run and a resume finish, all checkpoints verify."""
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.storage import Storage

    proxy.configure(slowdown=0.10, reset_before=0.025, reset_after=0.025)
    run_dir = f"s3://{s3_bucket}/flaky"
    env = dict(s3_env, AWS_ENDPOINT_URL=proxy.url)
    args = ["train", "--run-dir", run_dir, *TINY, "--checkpoint-every", "10", "--keep-last", "2"]  # 20 steps an epoch
    first = run_torchrun(2, [*args, "--max-steps", "30"], env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    # the resume reads every file back through the same faults (one process, forked: quicker)
    second = shared().run([*args, "--max-steps", "40", "--resume", "auto"], env=env, timeout=240)
    assert second.rc == 0, second.output[-4000:]
    assert "resuming from" in second.stderr and "s0000000030" in second.stderr
    assert proxy.counts["slowdown"] > 0 and proxy.counts["reset_before"] + proxy.counts["reset_after"] > 0, \
        proxy.counts
    assert "Traceback" not in first.stderr + second.stderr

    verdicts = catalog.scan(Storage(run_dir))  # straight to moto, no faults
    assert len(verdicts) == 2 and all(v.valid for v in verdicts), [(v.ref.name, v.reason) for v in verdicts]
    assert verdicts[-1].ref.step == 40
