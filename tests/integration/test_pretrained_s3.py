"""Pretrained weights from a dist_train run on S3 are read with the run's storage options.

The endpoint reaches the reader only through the storage options (no AWS_ENDPOINT_URL in the
environment), as for a self-hosted S3-compatible store named in `--storage-options`.
"""

from __future__ import annotations

import json

import boto3
import pytest
import torch

from dist_train import CheckpointManager
from dist_train.config.job import add_config_arguments, resolve
from dist_train.cli.parsing import Parser
from dist_train.errors import UserError
from dist_train.models.backbones import read_pretrained
from dist_train.models.registry import build_model, make_spec


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_pretrained_weights_from_s3_use_the_storage_options(moto_endpoint, s3_credentials, monkeypatch):
    for key, value in s3_credentials.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="pretrained")
    options = {"endpoint_url": moto_endpoint}
    url = "s3://pretrained/earlier-run"
    model = torch.nn.Linear(3, 2)
    mgr = CheckpointManager(url, storage_options=options)
    mgr.save(4, {"model": model})
    mgr.close()

    state = read_pretrained(url, options)  # the run dir: its newest valid checkpoint
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], model.weight.detach())
    # what training does: the registry hands the run's options to the backbone factory, which reads
    # the checkpoint (found and read, so its weights are judged: a Linear does not fit a resnet18)
    with pytest.raises(UserError, match="do not fit resnet18"):
        build_model(make_spec("resnet18", {}, {}, {"num_classes": 2}), url, options)

    parser = Parser(prog="t")
    add_config_arguments(parser)
    cfg = resolve(parser.parse_args(["--run-dir", "runs/x", "--model", "resnet18", "--pretrained-weights", url,
                                     "--storage-options", json.dumps(options)]))
    assert cfg.model.pretrained_weights == url  # a URL is not refused as a missing local file
