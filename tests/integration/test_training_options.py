"""Training options that change the math: schedules, accumulation, optimizers, and torchvision files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import TINY, manifests, run_forked
from dist_train.checkpoint.state import read_payload
from dist_train.checkpoint.storage import Storage
from dist_train.data.config import DataConfig
from dist_train.data.registry import build_datasets
from dist_train.training.config import OptimConfig
from dist_train.training.optim import ScheduleFactor


def test_schedules_warm_up_then_decay():
    cosine = ScheduleFactor(OptimConfig(lr_schedule="cosine", warmup_steps=4), total_steps=104)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == pytest.approx(1.0) and cosine(54) == pytest.approx(0.5) and cosine(104) == pytest.approx(0.0)
    step = ScheduleFactor(OptimConfig(lr_schedule="step", lr_step_size=10, lr_gamma=0.5), total_steps=100)
    assert [step(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    assert ScheduleFactor(OptimConfig(), 10)(7) == 1.0


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    folder = Storage(str(sorted(run_dir.glob("ckpt-*"))[-1]))
    return read_payload(folder, manifests(run_dir)[-1], model_only=True).model


@pytest.mark.timeout(120)
def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """2 micro-batches of 16 make the same optimizer step as one batch of 32 (the loss is a global mean)."""
    common = ["--epochs", "1", "--max-steps", "6", "--no-progress", "--optimizer", "sgd", "--lr", "0.1",
              "--grad-clip", "5.0", "--lr-schedule", "cosine", "--warmup-steps", "2"]
    a = run_forked(["train", "--run-dir", str(tmp_path / "a"), *common, "--batch-size", "32"])
    b = run_forked(["train", "--run-dir", str(tmp_path / "b"), *common, "--batch-size", "16", "--grad-accum", "2"])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5), key
    assert manifests(tmp_path / "a")[-1]["metrics"]["samples_seen"] == 6 * 32


@pytest.mark.timeout(120)
def test_adamw_with_step_schedule_and_augmentation_trains(tmp_path):
    result = run_forked(["train", "--run-dir", str(tmp_path / "r"), *TINY, "--optimizer", "adamw", "--weight-decay",
                      "0.01", "--lr-schedule", "step", "--lr-step-size", "20", "--augment", "--max-steps", "40"])
    assert result.returncode == 0, result.stderr
    final = manifests(tmp_path / "r")[-1]
    assert final["step"] == 40 and final["metrics"]["val_accuracy"] > 0.5


def _idx(path, array: np.ndarray) -> None:
    dtype_code = 0x08
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_is_read_from_the_data_root_without_download(tmp_path):
    """torchvision's real MNIST reader over small files in MNIST's own idx format."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    bundle = build_datasets(DataConfig(dataset="mnist", data_root=str(tmp_path), val_fraction=0.25), seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 12)
    x, y = bundle.train[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10 and bundle.num_classes == 10


@pytest.mark.timeout(180)
def test_the_last_validation_is_in_the_newest_checkpoint_when_max_steps_meets_an_interval(tmp_path, capsys):
    """--max-steps a multiple of --checkpoint-every, stopping mid-epoch: validate first, then save once."""
    run_dir = tmp_path / "run"
    result = run_forked(["train", "--run-dir", str(run_dir), "--epochs", "3", "--max-steps", "10",
                      "--checkpoint-every", "5", "--no-progress"])
    assert result.returncode == 0, result.stderr
    newest = manifests(run_dir)[-1]
    assert newest["step"] == 10 and newest["reason"] == "final"
    assert "val_loss" in newest["metrics"], "the final validation is not in any checkpoint"
    from conftest import call_cli
    code, out, _ = call_cli(["ckpt", "best", str(run_dir)], capsys)
    assert code == 0 and out.strip().endswith("ckpt-g0001-s0000000010")
