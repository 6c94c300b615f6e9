"""Credentials never appear in logs, manifests, metrics, the saved config or any error line.

A job writes to S3 (moto) through a flaky proxy (so retry warnings get logged too) with throwaway
credentials given both as AWS_* variables and in --storage-options; then the checkpoint commands and
a few failing commands run. Every line printed and every object written is searched for them.
"""

from __future__ import annotations

import json
import logging
import secrets

import boto3
import pytest

from conftest import run_cli
from support.fault_proxy import FaultProxy
from support.forkserver import shared

JOB = ["train", "--max-steps", "20", "--checkpoint-every", "10", "--epochs", "1", "--batch-size", "32",
       "--log-every", "5", "--no-progress", "--keep-last", "1"]


def _needles(s3_env: dict[str, str], extra: list[str]) -> list[str]:
    return [s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"], *extra]


@pytest.mark.timeout(240)
def test_credentials_never_leave_the_environment(s3_env, s3_bucket, moto_endpoint, tmp_path):
    key, secret = s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"]
    url_password = secrets.token_urlsafe(16)
    options = json.dumps({"key": key, "secret": secret})
    run_dir = f"s3://{s3_bucket}/run"
    printed: list[str] = []

    with FaultProxy(moto_endpoint, slowdown=0.05, reset_before=0.05, seed=7) as proxy:
        env = dict(s3_env, AWS_ENDPOINT_URL=proxy.url)
        job = run_cli([*JOB, "--run-dir", run_dir, "--storage-options", options], env=env)  # a real process
        printed += [job.stdout, job.stderr]
        assert job.returncode == 0, job.stderr[-3000:]
        assert proxy.counts["slowdown"] > 0

    server = shared()
    commands = [  # (argv, expected exit status)
        (["ckpt", "list", run_dir, "--json", "--storage-options", options], 0),
        (["ckpt", "verify", run_dir], 0),
        (["predict", "--checkpoint", run_dir, "--samples", "2"], 0),
        (["train", "--run-dir", f"s3://{key}:{url_password}@{s3_bucket}/other", "--print-config",
          "--storage-options", options], 0),
        (["train", "--run-dir", f"{run_dir}-x", "--storage-options", '{"secret": "' + secret + '", '], 2),
        (["train", "--run-dir", f"s3://no-such-{s3_bucket}/run", "--storage-options", options,
          "--max-steps", "1"], 2),
    ]
    for argv, status in commands:
        result = server.run(argv, env=s3_env)
        printed += [result.stdout, result.stderr]
        assert result.rc == status and "Traceback" not in result.stderr, (argv, result.output)
        if "--print-config" in argv:  # shows that storage options were given, not their values
            assert "***" in result.stdout and f"run_dir: s3://{s3_bucket}/other" in result.stdout, result.stdout

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    objects = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    written = {o["Key"]: client.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read() for o in objects}
    assert any(k.endswith("config.yaml") for k in written) and any(k.endswith("manifest.json") for k in written)
    assert any(k.endswith("metrics.jsonl") for k in written)

    for needle in _needles(s3_env, [url_password]):
        for text in printed:
            assert needle not in text, f"a credential was printed:\n{text[-2000:]}"
        for name, data in written.items():
            assert needle.encode() not in data, f"a credential was written into {name}"
    everything = "".join(printed)
    assert " DEBUG " not in everything and "botocore" not in everything, "library debug logging is on"


@pytest.mark.timeout(60)
def test_library_debug_logging_is_off_by_default():
    """The job's logging setup leaves botocore, s3fs and urllib3 at their quiet defaults."""
    import torch

    from dist_train.distributed.env import DistEnv, configure_logging

    configure_logging(DistEnv(0, 1, 0, torch.device("cpu"), None))
    for name in ("botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "fsspec"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    assert not logging.getLogger("dist_train").propagate
