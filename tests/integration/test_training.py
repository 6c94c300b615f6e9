"""The core job under real torchrun: it learns, shards are disjoint and complete, validation is global."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import manifests, run_torchrun
from dist_train.checkpoint.state import read_payload
from dist_train.checkpoint.storage import Storage
from dist_train.data.config import DataConfig
from dist_train.data.registry import build_datasets
from dist_train.models.registry import ModelSpec, build_model


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("train")
    run_dir, samples = base / "run", base / "samples"
    result = run_torchrun(2, ["train", "--run-dir", str(run_dir), "--epochs", "6", "--no-progress",
                              "--sample-log", str(samples), "--log-every", "10"])
    assert result.returncode == 0, result.stderr[-3000:]
    return base


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(180)
def test_two_ranks_learn_the_digits(two_rank_run):
    val = [m for m in metrics(two_rank_run / "run") if m.get("split") == "val"]
    assert len(val) == 6
    assert val[-1]["accuracy"] >= 0.9
    assert val[-1]["loss"] < val[0]["loss"]
    train = [m for m in metrics(two_rank_run / "run") if m.get("split") == "train"]
    assert all(m["samples_per_sec"] > 0 and m["lr"] > 0 for m in train)
    final = manifests(two_rank_run / "run")[-1]
    assert final["world_size"] == 2 and final["epoch"] == 6 and final["best"]["val_loss"] is not None


@pytest.mark.timeout(180)
def test_each_epoch_is_split_across_ranks_disjoint_and_complete(two_rank_run):
    per_rank: dict[int, Counter] = {}
    n_train = len(build_datasets(DataConfig(), seed=0).train)
    for rank in (0, 1):
        lines = [json.loads(l) for l in (two_rank_run / "samples" / f"rank{rank}-g0001.jsonl").read_text().splitlines()]
        per_rank[rank] = Counter((line["epoch"], i) for line in lines for i in line["indices"])
    for epoch in range(6):
        mine = {r: {i for (e, i), _ in per_rank[r].items() if e == epoch} for r in (0, 1)}
        assert not mine[0] & mine[1], "a sample went to both ranks"
        assert mine[0] | mine[1] == set(range(n_train)), "a sample of the epoch was never trained on"
        assert all(count == 1 for (e, _), count in (per_rank[0] + per_rank[1]).items() if e == epoch)


@pytest.mark.timeout(180)
def test_reported_validation_accuracy_is_the_whole_validation_set(two_rank_run):
    run_dir = two_rank_run / "run"
    final = manifests(run_dir)[-1]
    folder = Storage(str(sorted(run_dir.glob("ckpt-*"))[-1]))
    payload = read_payload(folder, final, model_only=True)
    model = build_model(ModelSpec.from_dict(final["model"]))
    model.load_state_dict(payload.model)
    model.eval()
    val = build_datasets(DataConfig(), seed=0).val
    inputs = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(inputs)
    accuracy = int((logits.argmax(1) == labels).sum()) / len(val)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    logged = [m for m in metrics(run_dir) if m.get("split") == "val"][-1]
    assert logged["count"] == len(val)  # both ranks' shards, not rank 0's
    assert logged["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert logged["loss"] == pytest.approx(loss, rel=1e-5)
    assert final["metrics"]["val_accuracy"] == pytest.approx(accuracy, abs=1e-9)
